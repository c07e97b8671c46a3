"""Protected-template gallery: enrol, verify, identify, revoke and re-key IoM hash codes.

The database never holds an image or a float embedding: per template only the subject name, the m
IoM indices (one uint8 each, `modules.deploy.search.pack_codes`), the id of the application key that
produced them (a hash, never the key), the model fingerprint and timestamps, plus an audit table.

Key modes. `application` (the default): one key for the whole gallery, in a local file (mode
0600; see `Storage` below for where); it is the permutation key of the IoM model's PermLayer: the same
photo hashed under another key gives an unrelated code, so `rekey` (new key, every stored code
deleted) re-issues every template, and 1:N `identify` works. `subject`: every subject gets a key of
its own at enrolment, handed to the subject (a file they keep) and never stored: the database holds
only its id, so a copy of the database and its directory holds no key. `verify` then needs the
subject's key; `identify` is not possible (it would need one key shared by all templates);
revoking and enrolling again issues a new key. What each mode protects against which attacker is
measured in docs/protection.md.

Storage (this part needs no TensorFlow): an SQLite file or a PostgreSQL database
(`modules.deploy.store`, same tables and rules). Every change is one transaction, so concurrent
writers queue and a killed process leaves either a whole enrolment or none; enrolments,
revocations and re-keys write the change log in that same transaction (`modules.deploy.changelog`).
`identify` searches this process's code index (`modules.deploy.index`), loaded once and then
brought up to date from the change log on every call, so a process sees what other processes
committed on its next call. The application key file is `<db>.key` beside an SQLite file; for
PostgreSQL it is `<dbname>.key` beside the configuration file unless `key_file` says otherwise:
never in the database.
"""
import os
import time

import numpy as np

from modules.deploy.changelog import (
    LiveIndex,
    last_template_id,
    log_enrolments,
    log_rekey,
    log_revocations,
)
from modules.deploy.keys import (
    PENDING_SUFFIX,
    SUBJECT_KEY_ID,
    finish_rekey,
    key_id,
    matching_key,
    new_key,
    write_key,
)
from modules.deploy.migrations import upgrade
from modules.deploy.search import pack_codes
from modules.deploy.store import SCHEMA_VERSION, check_schema_version, open_store
from modules.utils import UserError

FORMAT = 'iomface-gallery-1'
KEY_MODES = ('application', 'subject')
_MAX_NAME = 200


# ---------------------------------------------------------------------------------------------
# The database (rows kept by a store of modules.deploy.store: an SQLite file or PostgreSQL).
class NotEnrolled(UserError):
    """A subject name with no template in the gallery (the service answers 404)."""


class KeyChanged(UserError):
    """Codes made under a key the gallery no longer has (another process re-keyed it)."""


class WrongKeyMode(UserError):
    """An operation the gallery's key mode does not allow (identify or rekey with subject keys)."""


class SubjectKeyMismatch(UserError):
    """A further template of an enrolled subject offered under another subject key."""


def check_name(name):
    """A subject name: 1-200 printable characters."""
    if not isinstance(name, str) or not name.strip():
        raise UserError('a subject name must not be empty')
    if len(name) > _MAX_NAME or not name.isprintable():
        raise UserError(f'subject name {name[:40]!r}: at most {_MAX_NAME} printable characters')
    return name


def gallery_exists(db_path):
    """True when `db_path` (a file or a postgresql:// URL) already holds a gallery."""
    store = open_store(db_path)
    try:
        with store.errors():
            return store.exists()
    finally:
        store.close()


_TEMPLATE_COLUMNS = ('name', 'codes', 'key_id', 'model_fp', 'source', 'created')
_AUDIT_COLUMNS = ('time', 'event', 'name', 'detail')
_INSERT_AUDIT = 'INSERT INTO audit (time, event, name, detail) VALUES (?, ?, ?, ?)'


class Gallery:
    """An open gallery with its application key; see the module docstring."""

    def __init__(self, store, meta, key, key_file):
        self.store = store
        self.db_path = store.where
        self.meta = meta
        self.key = key
        self.key_file = key_file
        self.m = int(meta['m'])
        self.q = int(meta['q'])
        self._live = None  # the code index, made by the first identify

    # -- opening ------------------------------------------------------------------------------
    @staticmethod
    def check_new(db_path, key_file=None, cfg_path=None):
        """UserError when the database (or, in application-key mode, its key file) exists."""
        store = open_store(db_path)
        try:
            with store.errors():
                paths = [db_path] if store.exists() else []
                kpath = key_file or store.default_key_file(cfg_path or '.')
        finally:
            store.close()
        paths += [kpath] if os.path.lexists(kpath) else []
        if paths:
            raise UserError(f'{paths[0]} already exists: a gallery is initialised only once '
                            '(use `rekey` to change the key)')

    @classmethod
    def create(cls, db_path, cfg_path, m, q, model_fp, key_mode='application', key_file=None):
        """A new gallery (and, in application-key mode, its key file); refused when either exists."""
        if key_mode not in KEY_MODES:
            raise UserError(f"key mode {key_mode!r}: use one of {', '.join(KEY_MODES)}")
        store = open_store(db_path)
        try:
            with store.errors():
                if store.exists():
                    raise UserError(f'{db_path} already exists: a gallery is initialised only '
                                    'once (use `rekey` to change the key)')
                kpath = os.path.abspath(key_file or store.default_key_file(cfg_path))
            if key_mode == 'application' and os.path.lexists(kpath):
                raise UserError(f'{kpath} already exists: a gallery is initialised only once '
                                '(use `rekey` to change the key)')
            key = new_key() if key_mode == 'application' else None
            meta = {'format': FORMAT, 'schema_version': str(SCHEMA_VERSION),
                    'cfg_path': os.path.abspath(cfg_path), 'm': str(int(m)), 'q': str(int(q)),
                    'model_fp': model_fp, 'key_mode': key_mode,
                    'key_id': SUBJECT_KEY_ID if key is None else key_id(key),
                    'created': f'{time.time():.3f}', 'generation': '0'}
            audit = (time.time(), 'init', None, f"{key_mode} key {meta['key_id']}, model "
                     f'{model_fp[:16]}, m={m}, q={q}')
            written = []

            def write_key_file():
                if key is not None:
                    os.makedirs(os.path.dirname(kpath), exist_ok=True)
                    write_key(kpath, key)
                    written.append(kpath)
            try:
                store.create(sorted(meta.items()), audit, write_key_file)
            except BaseException:
                for path in written:  # no key file for a gallery that was not made
                    os.remove(path)
                raise
        finally:
            store.close()
        return cls.open(db_path, key_file)

    @classmethod
    def open(cls, db_path, key_file=None):
        """Open an existing gallery and check its key file; one UserError for anything wrong."""
        store = open_store(db_path)
        try:
            meta = store.open()
            if meta.get('format') != FORMAT:
                raise UserError(f"{db_path}: unknown gallery format {meta.get('format')!r} "
                                f'(expected {FORMAT})')
            check_schema_version(db_path, meta)
            meta = upgrade(store, meta)  # an older gallery gets the newer tables, in place
            # Galleries made before key modes existed have no key_mode row: application keys.
            meta.setdefault('key_mode', 'application')
            kpath = key_file or store.default_key_file(meta.get('cfg_path', '.'))
            key = (matching_key(db_path, kpath, meta['key_id'])
                   if meta['key_mode'] == 'application' else None)
        except BaseException:
            store.close()
            raise
        return cls(store, meta, key, kpath)

    def reopen(self):
        """Another handle on the same gallery and key file (a connection for another thread)."""
        return type(self).open(self.db_path, self.key_file)

    def close(self):
        """Close the connection."""
        self.store.close()

    def refresh(self):
        """Catch up with other processes: the generation and, after a rekey elsewhere, the new
        application key (read from the key file). Returns the generation."""
        for attempt in range(3):
            rows = dict(self._read("SELECT key, value FROM meta WHERE key IN ('generation', "
                                   "'key_id')"))
            if rows['key_id'] == self.meta['key_id'] or self.subject_keys:
                return rows['generation']
            try:
                self.key = matching_key(self.db_path, self.key_file, rows['key_id'])
            except UserError:
                if attempt == 2:
                    raise
                continue  # re-keyed once more meanwhile: the key file is newer than what we read
            self.meta['key_id'] = rows['key_id']
            return rows['generation']

    def _write(self):
        """One write transaction that also moves the generation counter."""
        return self.store.write()

    # -- service tokens (their digests; modules.deploy.tokens makes and checks them) ----------
    def add_token_row(self, digest, role, created):
        """Store a token digest with its role."""
        with self._write() as conn:
            self.store.ensure_tokens_table(conn)
            conn.execute('INSERT INTO tokens VALUES (?, ?, ?)', (digest, role, created))

    def token_rows(self):
        """[(digest, role, created)] of the stored tokens, oldest first."""
        if 'tokens' not in self.store.tables():
            return []
        return self._read('SELECT digest, role, created FROM tokens ORDER BY created')

    def delete_token_row(self, digest):
        """Delete one stored token digest."""
        with self._write() as conn:
            conn.execute('DELETE FROM tokens WHERE digest = ?', (digest,))

    def _read(self, sql, args=()):
        return self.store.read(sql, args)

    def _check_key_inside(self, conn, kid):
        """Inside a write transaction (writers serialised): refuse codes of a replaced key."""
        stored = conn.execute("SELECT value FROM meta WHERE key = 'key_id'").fetchone()[0]
        if stored != kid:
            raise KeyChanged(f'{self.db_path} was re-keyed (key id {stored}) after these codes '
                             f'were made under key {kid}: hash the photos again')

    # -- checks -------------------------------------------------------------------------------
    def check_model(self, model_fp, m, q):
        """Refuse a hashing model other than the one the gallery was made with."""
        if (int(m), int(q)) != (self.m, self.q):
            raise UserError(f'{self.db_path}: made for codes m={self.m} q={self.q}, the model '
                            f'gives m={m} q={q}')
        if model_fp != self.meta['model_fp']:
            raise UserError(f"{self.db_path}: made by another model (fingerprint "
                            f"{self.meta['model_fp'][:16]}, this model {model_fp[:16]}); use the "
                            "config and checkpoints it was initialised with")

    # -- writing ------------------------------------------------------------------------------
    @property
    def subject_keys(self):
        """True for a subject-key gallery (a key per subject, held by the subject)."""
        return self.meta['key_mode'] == 'subject'

    def _refuse_in_subject_mode(self, what, why):
        if self.subject_keys:
            raise WrongKeyMode(f'{self.db_path} is a subject-key gallery: {what} is not possible '
                            f'({why})')

    def check_can_identify(self):
        """UserError for a subject-key gallery, where 1:N search is impossible."""
        self._refuse_in_subject_mode('identify', '1:N search compares a probe with every '
                                     'template, which needs one key shared by all of them: use '
                                     'an application-key gallery, or verify a named subject with '
                                     'its key')

    def check_can_rekey(self):
        """UserError for a subject-key gallery, which has no application key to change."""
        self._refuse_in_subject_mode('rekey', 'there is no application key; a subject gets a new '
                                     'key by being revoked and enrolled again')

    def subject_key_id(self, name):
        """Id of the key a subject's templates were made with; UserError for an unknown name."""
        rows = self._read('SELECT DISTINCT key_id FROM templates WHERE name = ?', (name,))
        if not rows:
            raise UserError(f'{name!r} is not enrolled in {self.db_path}')
        return rows[0][0]

    def key_matches(self, name, key):
        """True when `key` is the key `name` was enrolled with (always True for application keys)."""
        return not self.subject_keys or key_id(key) == self.subject_key_id(name)

    def _rows(self, names, codes, sources, now, kid=None):
        packed = pack_codes(codes, self.q, 'codes')
        if packed.shape[1] != self.m:
            raise UserError(f'codes have length {packed.shape[1]}, the gallery holds m={self.m}')
        kid, fp = kid or self.meta['key_id'], self.meta['model_fp']
        return [(name, row.tobytes(), kid, fp, src, now)
                for name, row, src in zip(names, packed, sources)]

    def enroll(self, name, codes, sources, only_new=False, subject_key=None, made_under=None):
        """Add the templates (rows of `codes`) of one subject in one transaction.

        With only_new, nothing is written when the subject is already enrolled (checked inside
        the transaction, so concurrent enrolments of one subject add it once). In subject-key
        mode `subject_key` is the key the codes were made with: only its id is stored, and a
        subject already enrolled must come with the same key. In application-key mode
        `made_under` is the id of the key the codes were made with (default: the key this
        process holds): checked inside the transaction, so a rekey by another process in the
        meantime refuses them (KeyChanged) rather than leave codes of two keys. Returns the
        number of templates added.
        """
        check_name(name)
        codes = np.atleast_2d(codes)
        if len(codes) != len(sources) or not len(codes):
            raise UserError(f'{name}: need one source per code and at least one code')
        if self.subject_keys != (subject_key is not None):
            raise UserError(f'{self.db_path}: a {self.meta["key_mode"]}-key gallery enrols '
                            + ('with the subject\'s key' if self.subject_keys else
                               'under its application key, not a subject key'))
        kid = None if subject_key is None else key_id(subject_key)
        now = time.time()
        rows = self._rows([name] * len(codes), codes, sources, now, kid)
        with self._write() as conn:
            if kid is None:
                self._check_key_inside(conn, made_under or self.meta['key_id'])
            held = conn.execute('SELECT key_id FROM templates WHERE name = ? LIMIT 1',
                                (name,)).fetchone()
            if only_new and held:
                return 0
            if held and kid and held[0] != kid:
                raise SubjectKeyMismatch(f'{name!r} is enrolled under another key: give the key file '
                                'issued at the first enrolment, or revoke and enrol again for a '
                                'new key')
            first = last_template_id(conn)
            conn.executemany('INSERT INTO templates (name, codes, key_id, model_fp, source, '
                             'created) VALUES (?, ?, ?, ?, ?, ?)', rows)
            log_enrolments(conn, first)
            conn.execute(_INSERT_AUDIT, (now, 'enroll', name, f'{len(rows)} template(s) from '
                          + ', '.join(sorted(set(sources)))[:500]))
        return len(rows)

    def enroll_bulk(self, names, codes, source='bulk'):
        """Add one template per row of `codes` for `names` (one subject each) in one transaction:
        the fast path for large imports (application keys only). Returns the number added."""
        self._refuse_in_subject_mode('bulk enrolment', 'each subject needs a key of its own')
        codes = np.asarray(codes)
        if len(names) != len(codes):
            raise UserError(f'{len(names)} names for {len(codes)} codes')
        for name in set(names):
            check_name(name)
        now = time.time()
        rows = self._rows(names, codes, [source] * len(names), now)
        with self._write() as conn:
            self._check_key_inside(conn, self.meta['key_id'])
            first = last_template_id(conn)
            # COPY on PostgreSQL: row-by-row inserts would be the bottleneck of a large import.
            self.store.copy_rows(conn, 'templates', _TEMPLATE_COLUMNS, rows)
            log_enrolments(conn, first)
            self.store.copy_rows(conn, 'audit', _AUDIT_COLUMNS,
                                 ((now, 'enroll', name, f'1 template from {source}')
                                  for name in names))
        return len(rows)

    def revoke(self, name):
        """Delete every template of a subject, and its failed attempts; UserError for an unknown
        name."""
        with self._write() as conn:
            log_revocations(conn, name)
            deleted = conn.execute('DELETE FROM templates WHERE name = ?', (name,)).rowcount
            if not deleted:
                raise NotEnrolled(f'{name!r} is not enrolled in {self.db_path}')
            # Whoever is enrolled under this name next starts with a clean count.
            conn.execute("DELETE FROM attempts WHERE scope = 'subject' AND name = ?", (name,))
            conn.execute(_INSERT_AUDIT, (time.time(), 'revoke', name, f'{deleted} template(s) deleted'))
        return deleted

    def rekey(self):
        """New application key: every stored template is deleted (subjects must re-enrol)."""
        self.check_can_rekey()
        new = new_key()
        pending = self.key_file + PENDING_SUFFIX
        write_key(pending, new)
        new_id = key_id(new)
        with self._write() as conn:
            # The key id inside the transaction: another process may have re-keyed since.
            old_id = conn.execute("SELECT value FROM meta WHERE key = 'key_id'").fetchone()[0]
            deleted = conn.execute('DELETE FROM templates').rowcount
            log_rekey(conn)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'key_id'", (new_id,))
            conn.execute(_INSERT_AUDIT, (time.time(), 'rekey', None,
                          f'key {old_id} -> {new_id}, {deleted} template(s) deleted'))
        finish_rekey(pending, self.key_file, new)
        self.meta['key_id'], self.key = new_id, new
        return deleted

    # -- reading ------------------------------------------------------------------------------
    def subjects(self):
        """[(name, templates, first enrolled, last enrolled)] sorted by name."""
        return self._read('SELECT name, COUNT(*), MIN(created), MAX(created) FROM templates '
                          'GROUP BY name ORDER BY name')

    def enrolled_names(self):
        """The set of enrolled subject names."""
        return {r[0] for r in self._read('SELECT DISTINCT name FROM templates')}

    def audit(self):
        """[(time, event, name, detail)] in order."""
        return self._read('SELECT time, event, name, detail FROM audit ORDER BY id')

    def count(self):
        """Number of stored templates."""
        return self._read('SELECT COUNT(*) FROM templates')[0][0]

    def templates_of(self, name):
        """uint8 codes (n, m) of one subject; UserError for an unknown name."""
        rows = self._read('SELECT codes FROM templates WHERE name = ? ORDER BY id', (name,))
        if not rows:
            raise NotEnrolled(f'{name!r} is not enrolled in {self.db_path}')
        return self._decode(b''.join(r[0] for r in rows))

    def _decode(self, blob):
        if len(blob) % self.m:
            raise UserError(f'{self.db_path}: a stored code does not have m={self.m} bytes '
                            '(damaged database)')
        return np.frombuffer(blob, np.uint8).reshape(-1, self.m)

    def sync_index(self):
        """This process's code index, brought up to date: loaded by the first call, then only the
        change-log rows committed since the last call are applied."""
        if self._live is None:
            self._live = LiveIndex(self.store, self.m, self.q)
        self._live.sync()
        return self._live.index

    def indexed(self):
        """Templates in the code index as of its last update (0 before the first identify)."""
        return 0 if self._live is None or self._live.index is None else len(self._live.index)

    def verify(self, name, code):
        """Smallest Hamming distance between `code` and the subject's templates."""
        probe = pack_codes(np.atleast_2d(code), self.q, 'probe code')
        return int(np.min(np.count_nonzero(self.templates_of(name) != probe, axis=1)))

    def identify(self, code, top_k=5, _retry=True):
        """[(name, distance, template id)] of the top_k closest templates, best first."""
        self.check_can_identify()
        index = self.sync_index()
        if not len(index):
            raise NotEnrolled(f'{self.db_path}: no one is enrolled')
        probe = pack_codes(np.atleast_2d(code), self.q, 'probe code')
        found, score = index.search(probe, min(int(top_k), len(index)))
        found = found[0].tolist()
        marks = ','.join('?' * len(found))
        names = dict(self._read(f'SELECT id, name FROM templates WHERE id IN ({marks})', found))
        if len(names) < len(found) and _retry:
            # Revoked since the index was updated (another process): search once more.
            return self.identify(code, top_k, _retry=False)
        # Never a template revoked before this call: left out if it goes in the meantime.
        return [(names[t], self.m - int(s), t) for t, s in zip(found, score[0]) if t in names]


