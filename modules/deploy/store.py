"""Where a gallery's rows live: one small interface, an SQLite and a PostgreSQL implementation.

`modules.deploy.gallery.Gallery` holds every rule (keys, names, audit, decisions) and speaks SQL with `?`
placeholders; a store owns the connection, the schema, transactions, bulk copy and the translation
of database failures into one-line `UserError`s. The search itself always runs in memory
(`modules.deploy.search`), whatever stores the rows.

SQLite (a file path): WAL journal, every write one `BEGIN IMMEDIATE` transaction, so concurrent
writers queue on the file lock. PostgreSQL (`postgresql://user@host:port/dbname`, or libpq's PG*
variables and service file): every write is one transaction whose first statement moves the
`generation` row of `meta`, which row-locks it, so writers of every process queue there just as
they do on SQLite's lock, and each then sees everything committed before it. Attempt counters
(`modules.deploy.attempts`) are written without moving the generation: they change no code, so no
reader's cache is dropped for them; their rows are locked instead (`row_lock`). A lost connection
is reported as `DatabaseUnavailable` and reopened on the next call. Galleries of an older schema
are upgraded in place when opened (`modules.deploy.migrations`).
"""
import contextlib
import os
import re
import secrets
import sqlite3

from modules.deploy.changelog import PG_CHANGES, SQLITE_CHANGES
from modules.utils import UserError

# 2: attempt counters and their audit events; 3: the change log (modules.deploy.migrations).
SCHEMA_VERSION = 3
TABLES = ('meta', 'templates', 'audit', 'tokens', 'attempts', 'changes')
_BUSY_TIMEOUT_S = 120.0
_CONNECT_TIMEOUT_S = 5
_SCAN_ROWS = 16384
_PG_PREFIXES = ('postgresql://', 'postgres://')
AUDIT_EVENTS = ('init', 'enroll', 'revoke', 'rekey', 'failure', 'lockout', 'unlock')
AUDIT_CHECK = f"CHECK (event IN ({', '.join(repr(e) for e in AUDIT_EVENTS)}))"
_TOKENS_ROLE_CHECK = "CHECK (role IN ('admin', 'client'))"

_SQLITE_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE templates (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    codes BLOB NOT NULL,
    key_id TEXT NOT NULL,
    model_fp TEXT NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL);
CREATE INDEX templates_name ON templates (name);
"""
SQLITE_AUDIT = f"""
CREATE TABLE {{table}} (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    event TEXT NOT NULL {AUDIT_CHECK},
    name TEXT,
    detail TEXT NOT NULL)"""


def attempts_table(real):
    """CREATE TABLE of the attempt counters (modules.deploy.attempts), `real` the float type:
    consecutive failures and the end of the lockout (UNIX s) per subject or per token id."""
    return f"""CREATE TABLE IF NOT EXISTS attempts (
        scope TEXT NOT NULL CHECK (scope IN ('subject', 'token')),
        name TEXT NOT NULL,
        failures INTEGER NOT NULL,
        locked_until {real} NOT NULL,
        PRIMARY KEY (scope, name))"""


# Made on the first token, so SQLite galleries from before the service open unchanged.
_SQLITE_TOKENS = f"""
CREATE TABLE IF NOT EXISTS tokens (
    digest TEXT PRIMARY KEY,
    role TEXT NOT NULL {_TOKENS_ROLE_CHECK},
    created REAL NOT NULL)
"""
_PG_SCHEMA = [
    'CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)',
    """CREATE TABLE templates (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL,
        codes BYTEA NOT NULL,
        key_id TEXT NOT NULL,
        model_fp TEXT NOT NULL,
        source TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL)""",
    'CREATE INDEX templates_name ON templates (name)',
    f"""CREATE TABLE audit (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        time DOUBLE PRECISION NOT NULL,
        event TEXT NOT NULL {AUDIT_CHECK},
        name TEXT,
        detail TEXT NOT NULL)""",
    f"""CREATE TABLE tokens (
        digest TEXT PRIMARY KEY,
        role TEXT NOT NULL {_TOKENS_ROLE_CHECK},
        created DOUBLE PRECISION NOT NULL)""",
    attempts_table('DOUBLE PRECISION'),
]
# Every write moves the change counter first: on PostgreSQL this row lock is what serialises
# writers (see the module docstring); readers compare it with the one their cache was built at.
BUMP_GENERATION = ("UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) "
                   "WHERE key = 'generation'")


# Column types for binary COPY (the columns Gallery bulk-inserts).
_PG_TYPES = {'name': 'text', 'codes': 'bytea', 'key_id': 'text', 'model_fp': 'text',
             'source': 'text', 'created': 'float8', 'time': 'float8', 'event': 'text',
             'detail': 'text'}


class DatabaseUnavailable(UserError):
    """The database server cannot be reached right now (the service answers 503 and retries)."""


def is_postgres(db):
    """True for a PostgreSQL connection URL, False for an SQLite file path."""
    return isinstance(db, str) and db.startswith(_PG_PREFIXES)


def open_store(db):
    """The store of `--db`: a PostgreSQL URL or an SQLite file path."""
    if not db:
        raise UserError('--db is empty: give an SQLite file or a postgresql:// URL')
    return PostgresStore(db) if is_postgres(db) else SQLiteStore(db)


def check_schema_version(where, meta):
    """UserError for a gallery written by a newer IoMFace (rows this code would misread); the
    gallery's schema version."""
    try:
        version = int(meta.get('schema_version', '1'))
    except ValueError:
        raise UserError(f"{where}: schema_version {meta['schema_version']!r} is not a number "
                        '(damaged gallery)') from None
    if version > SCHEMA_VERSION:
        raise UserError(f'{where}: gallery schema version {version} is newer than this IoMFace '
                        f'reads (up to {SCHEMA_VERSION}); upgrade IoMFace')
    return version



class SQLiteStore:
    """A gallery in one SQLite file (the embedded default)."""

    # Appended to a SELECT inside a write transaction to lock the rows read: nothing here, as
    # BEGIN IMMEDIATE already holds the file's write lock.
    row_lock = ''
    CHANGES_DDL = SQLITE_CHANGES

    def __init__(self, path):
        self.where = path
        self.path = path
        self.conn = None

    # -- life cycle ---------------------------------------------------------------------------
    def exists(self):
        """True when the database file exists."""
        return os.path.lexists(self.path)

    def default_key_file(self, cfg_path):
        """The application key file: `<db>.key` beside the database."""
        return self.path + '.key'

    @contextlib.contextmanager
    def errors(self):
        """Turn SQLite failures into one UserError naming the database file."""
        try:
            yield
        except sqlite3.DatabaseError as err:
            raise UserError(f'{self.where}: not a usable gallery database ({err}); restore it '
                            'from a backup or start again with `gallery.py init`') from None

    def create(self, meta_rows, audit_row, before_commit):
        """Write schema, meta and the init audit row into a new file; `before_commit()` (which
        writes the key file) runs before the file appears under its name."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f'{self.path}.{secrets.token_hex(4)}.init'
        try:
            with self.errors(), contextlib.closing(sqlite3.connect(tmp)) as conn:
                conn.execute('PRAGMA journal_mode=WAL')
                conn.executescript(_SQLITE_SCHEMA)
                conn.execute(SQLITE_AUDIT.format(table='audit'))
                conn.execute(attempts_table('REAL'))
                for statement in SQLITE_CHANGES:
                    conn.execute(statement)
                conn.executemany('INSERT INTO meta VALUES (?, ?)', meta_rows)
                conn.execute('INSERT INTO audit (time, event, name, detail) VALUES (?, ?, ?, ?)',
                             audit_row)
                conn.commit()
            before_commit()
            os.rename(tmp, self.path)  # the database appears only once complete, with its key
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise

    def open(self):
        """Connect, check the tables; return the meta rows as a dict."""
        if not os.path.isfile(self.path):
            raise UserError(f'{self.path}: gallery database not found (create it with '
                            '`gallery.py init`)')
        with self.errors():
            self.conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
            try:
                # WAL mode is set once by `create` (it persists in the file). With WAL,
                # synchronous=NORMAL keeps every committed transaction through a process crash
                # (SIGKILL); only a power cut may lose the last ones, never consistency.
                self.conn.execute('PRAGMA synchronous=NORMAL')
                if not {'meta', 'templates', 'audit'} <= self.tables():
                    raise UserError(f'{self.path}: not a gallery database (tables missing)')
                return dict(self.conn.execute('SELECT key, value FROM meta'))
            except BaseException:
                self.close()
                raise

    def close(self):
        """Close the connection."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- statements ---------------------------------------------------------------------------
    def tables(self):
        """Names of the tables present."""
        return {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = "
                                                "'table'")}

    @contextlib.contextmanager
    def write(self, bump=True):
        """One write transaction (generation moved first, unless `bump` is False: writes that
        change no code, like attempt counters); yields the connection."""
        with self.errors():
            self.conn.execute('BEGIN IMMEDIATE')
            try:
                if bump:
                    self.conn.execute(BUMP_GENERATION)
                yield self.conn
                self.conn.execute('COMMIT')
            except BaseException:
                self.conn.execute('ROLLBACK')
                raise

    def ensure_tokens_table(self, conn):
        """Create the tokens table inside a write transaction when missing."""
        conn.execute(_SQLITE_TOKENS)

    def copy_rows(self, conn, table, columns, rows):
        """Insert many rows inside a write transaction."""
        conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                         f"({', '.join('?' * len(columns))})", rows)

    def read(self, sql, args=()):
        """All rows of one query."""
        with self.errors():
            return self.conn.execute(sql, args).fetchall()

    def scan(self, first, stream, consume, args=(), size=_SCAN_ROWS):
        """The rows of query `first` (None: none), and those of `stream` handed to
        consume(rows) `size` at a time, all from one snapshot."""
        with self.errors():
            self.conn.execute('BEGIN')
            try:
                head = self.conn.execute(first).fetchall() if first else []
                cursor = self.conn.execute(stream, args)
                while rows := cursor.fetchmany(size):
                    consume(rows)
                return head
            finally:
                self.conn.execute('COMMIT')

    def checkpoint(self):
        """Fold the WAL into the database file (for a size measurement or a file copy)."""
        with self.errors():
            self.conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')


class _PgTx:
    """A PostgreSQL transaction with the sqlite3-like calls `Gallery` makes (`?` placeholders)."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql, args=()):
        """Run one statement; the cursor (rowcount, fetchone, fetchall)."""
        return self.conn.execute(_pg_sql(sql), args)

    def executemany(self, sql, rows):
        """Run one statement per row of `rows`."""
        with self.conn.cursor() as cur:
            cur.executemany(_pg_sql(sql), list(rows))


def _pg_sql(sql):
    # Our statements hold no '?' other than placeholders (names and values are always passed).
    return sql.replace('?', '%s')


def _one_line(err):
    text = ' '.join(str(err).split())
    return re.sub(r'^connection failed: ', '', text)[:400] or type(err).__name__


class PostgresStore:
    """A gallery in a PostgreSQL database (libpq connection string; no password in it)."""

    row_lock = ' FOR UPDATE'  # see SQLiteStore.row_lock
    CHANGES_DDL = PG_CHANGES

    def __init__(self, url):
        from psycopg.conninfo import conninfo_to_dict
        try:
            params = conninfo_to_dict(url)
        except Exception as err:  # psycopg.ProgrammingError: a malformed URL
            raise UserError(f'--db {url!r}: not a valid PostgreSQL URL ({_one_line(err)})') from None
        if params.get('password'):
            raise UserError('--db: keep the password out of the URL (it would show in the process '
                            'list); use ~/.pgpass, PGPASSFILE, PGPASSWORD or a service file')
        self.where = url
        self.url = url
        self.conn = None
        self.dbname = None

    def _connection(self, check=False):
        """The open connection, reconnecting after a loss; DatabaseUnavailable when it fails.
        With `check`, a connection kept from before is pinged first: one that died with a
        server restart is replaced instead of failing the caller's transaction."""
        import psycopg
        if self.conn is not None and not self.conn.closed and not self.conn.broken:
            if not check:
                return self.conn
            try:
                self.conn.execute('SELECT 1')
                return self.conn
            except psycopg.OperationalError:
                pass  # gone since its last use (e.g. the server restarted): connect again
        self.close()
        try:
            self.conn = psycopg.connect(self.url, autocommit=True,
                                        connect_timeout=_CONNECT_TIMEOUT_S,
                                        application_name='iomface-gallery')
        except psycopg.OperationalError as err:
            raise DatabaseUnavailable(
                f'{self.where}: cannot connect to PostgreSQL ({_one_line(err)}); check host, '
                'port, user, database name and password (~/.pgpass, PGPASSWORD, PG* '
                'variables)') from None
        self.dbname = self.conn.info.dbname
        return self.conn

    @contextlib.contextmanager
    def errors(self):
        """Turn a lost connection into DatabaseUnavailable, other failures into a UserError."""
        import psycopg
        try:
            yield
        except psycopg.OperationalError as err:
            self.close()  # the next call connects again
            raise DatabaseUnavailable(f'{self.where}: database unavailable ({_one_line(err)})') \
                from None
        except psycopg.Error as err:
            raise UserError(f'{self.where}: database error ({_one_line(err)})') from None

    # -- life cycle ---------------------------------------------------------------------------
    def exists(self):
        """True when the database already holds a gallery (its meta table)."""
        return 'meta' in self.tables()

    def default_key_file(self, cfg_path):
        """The application key file: `<dbname>.key` beside the configuration file."""
        self._connection()
        return os.path.join(os.path.dirname(os.path.abspath(cfg_path)), f'{self.dbname}.key')

    def create(self, meta_rows, audit_row, before_commit):
        """Create schema, meta and the init audit row in one transaction (PostgreSQL's DDL is
        transactional: the gallery exists whole or not at all); `before_commit()` writes the key."""
        conn = self._connection()
        with self.errors(), conn.transaction():
            for statement in _PG_SCHEMA + PG_CHANGES:
                conn.execute(statement)
            tx = _PgTx(conn)
            tx.executemany('INSERT INTO meta VALUES (?, ?)', meta_rows)
            tx.execute('INSERT INTO audit (time, event, name, detail) VALUES (?, ?, ?, ?)',
                       audit_row)
            before_commit()

    def open(self):
        """Connect, check the tables; return the meta rows as a dict."""
        tables = self.tables()
        if 'meta' not in tables:
            raise UserError(f'{self.where}: no gallery in this database (create it with '
                            '`gallery.py init`)')
        if not {'templates', 'audit'} <= tables:
            raise UserError(f'{self.where}: not a gallery database (tables missing)')
        return dict(self.read('SELECT key, value FROM meta'))

    def close(self):
        """Close the connection."""
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    # -- statements ---------------------------------------------------------------------------
    def tables(self):
        """Names of our tables present in the connection's schema search path."""
        rows = self.read('SELECT name FROM unnest(CAST(? AS TEXT[])) AS name '
                         'WHERE to_regclass(name) IS NOT NULL', (list(TABLES),))
        return {r[0] for r in rows}

    @contextlib.contextmanager
    def write(self, bump=True):
        """One write transaction (generation moved, and so row-locked, first, unless `bump` is
        False: writes that change no code, serialised by their own row locks)."""
        conn = self._connection(check=True)
        with self.errors(), conn.transaction():
            if bump:
                conn.execute(BUMP_GENERATION)
            yield _PgTx(conn)

    def ensure_tokens_table(self, conn):
        """The tokens table is part of the PostgreSQL schema from the start."""

    def copy_rows(self, tx, table, columns, rows):
        """Insert many rows with a binary COPY inside a write transaction."""
        with tx.conn.cursor() as cur, cur.copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([_PG_TYPES[c] for c in columns])
            for row in rows:
                copy.write_row(row)

    def _retried(self, fn):
        """fn(connection) of a read; once more on a new connection when the kept one had died
        (reads can be repeated; a failure on a fresh connection is reported)."""
        import psycopg
        fresh = self.conn is None or self.conn.closed or self.conn.broken
        conn = self._connection()
        with self.errors():
            try:
                return fn(conn)
            except psycopg.OperationalError:
                if fresh:
                    raise
            self.close()
            return fn(self._connection())

    def read(self, sql, args=()):
        """All rows of one query."""
        return self._retried(lambda conn: conn.execute(_pg_sql(sql), args).fetchall())

    def scan(self, first, stream, consume, args=(), size=_SCAN_ROWS):
        """The rows of query `first` (None: none), and those of `stream` handed to
        consume(rows) `size` at a time (a server-side cursor), all from one snapshot. Not
        repeated on a lost connection: consume() may have taken rows already."""
        conn = self._connection(check=True)
        with self.errors(), conn.transaction():
            conn.execute('SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY')
            head = conn.execute(_pg_sql(first)).fetchall() if first else []
            with conn.cursor(name='iomface_scan', binary=True) as cursor:
                cursor.execute(_pg_sql(stream), args)
                while rows := cursor.fetchmany(size):
                    consume(rows)
            return head

    def checkpoint(self):
        """Nothing to fold: the server manages its own files."""
