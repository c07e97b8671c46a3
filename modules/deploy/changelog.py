"""The gallery's change log, and the live code index every instance keeps by following it.

Every enrolment, revocation and re-key writes its rows into `changes` (seq, template_id, op)
inside its own transaction, so a change and its log rows commit together or not at all: no
process can see a template the log does not announce, or miss a revocation. `seq` only grows
(SQLite AUTOINCREMENT, a PostgreSQL identity) and writers are serialised (see `store`), so when a
reader sees row s, every row below s has committed too.

A `LiveIndex` holds a `CodeIndex` of the gallery and the last seq it has applied. `sync()` loads
everything once (templates streamed in chunks into the bit planes, with the log's top seq from
the same snapshot), then reads only the rows after that seq: one indexed query when nothing
changed, the new codes when something did. Only a re-key (its row, op 'rekey', replaces the whole
log) or a new process loads everything again. On PostgreSQL a trigger sends NOTIFY on
`CHANNEL` with every commit that writes the log; `ChangeWatcher` listens for it so an idle
instance catches up without waiting for a request (polling while the listener is down).
"""
import concurrent.futures
import threading

import numpy as np

from modules.deploy.index import CodeIndex, OutOfOrder
from modules.utils import UserError

CHANNEL = 'iomface_changes'
_OPS_CHECK = "CHECK (op IN ('enroll', 'revoke', 'rekey'))"
SQLITE_CHANGES = [f"""CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    template_id INTEGER,
    op TEXT NOT NULL {_OPS_CHECK})"""]
PG_CHANGES = [
    f"""CREATE TABLE IF NOT EXISTS changes (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        template_id BIGINT,
        op TEXT NOT NULL {_OPS_CHECK})""",
    # NOTIFY inside the writer's transaction: PostgreSQL delivers it when (and only if) it commits.
    f"""CREATE OR REPLACE FUNCTION iomface_changes_notify() RETURNS trigger LANGUAGE plpgsql AS
        $body$ BEGIN PERFORM pg_notify('{CHANNEL}', ''); RETURN NULL; END $body$""",
    'DROP TRIGGER IF EXISTS changes_notify ON changes',
    """CREATE TRIGGER changes_notify AFTER INSERT ON changes FOR EACH STATEMENT
        EXECUTE FUNCTION iomface_changes_notify()""",
]
_SCAN_ROWS = 4096  # rows per fetch when loading: little transient memory, few round trips
_DELTA_HEAD = ("SELECT MAX(seq), SUM(CASE WHEN op = 'rekey' THEN 1 ELSE 0 END) FROM changes "
               'WHERE seq > ?')
_DELTA_ROWS = ('SELECT c.seq, c.op, c.template_id, t.codes FROM changes c LEFT JOIN templates t '
               "ON c.op = 'enroll' AND t.id = c.template_id WHERE c.seq > ? AND c.seq <= ? "
               'ORDER BY c.seq')


# -- writing (inside the writer's transaction) ---------------------------------------------------
def last_template_id(conn):
    """The largest template id now (0 when empty): call before inserting, then `log_enrolments`."""
    return conn.execute('SELECT COALESCE(MAX(id), 0) FROM templates').fetchone()[0]


def log_enrolments(conn, after_id):
    """Log every template inserted since `last_template_id` returned `after_id`."""
    conn.execute("INSERT INTO changes (template_id, op) SELECT id, 'enroll' FROM templates "
                 'WHERE id > ? ORDER BY id', (after_id,))


def log_revocations(conn, name):
    """Log the templates of `name` (call before deleting them)."""
    conn.execute("INSERT INTO changes (template_id, op) SELECT id, 'revoke' FROM templates "
                 'WHERE name = ? ORDER BY id', (name,))


def log_rekey(conn):
    """Replace the log by one 'rekey' row: every instance that has not seen it loads again."""
    conn.execute('DELETE FROM changes')
    conn.execute("INSERT INTO changes (template_id, op) VALUES (NULL, 'rekey')")


# -- following -----------------------------------------------------------------------------------
class LiveIndex:
    """A `CodeIndex` of one gallery, kept current by applying its change log."""

    def __init__(self, store, m, q, scan_rows=_SCAN_ROWS, **index_options):
        self.store, self.m, self.q = store, int(m), int(q)
        self.scan_rows = scan_rows
        self.index_options = index_options
        self.index = None
        self.seq = None  # the last change-log row applied
        self.loads = 0  # full loads so far (a change applied as a delta does not count)

    def sync(self):
        """Catch up with the database; the number of change-log rows applied (None: loaded)."""
        if self.index is None:
            return self._load()
        (top, rekeys), = self.store.read(_DELTA_HEAD, (self.seq,))
        if top is None:
            return 0
        if rekeys:
            return self._load()
        applied = []
        try:
            self.store.scan(None, _DELTA_ROWS, lambda rows: applied.append(self._apply(rows)),
                            (self.seq, top), self.scan_rows)
        except OutOfOrder:
            # Rows this index cannot take in order (ids not above the ones held: never written
            # by IoMFace, but a hand-edited database may hold them): start again from a snapshot.
            return self._load()
        self.seq = top
        return sum(applied)

    def _load(self):
        index = CodeIndex(self.m, self.q, **self.index_options)
        pending = []

        def consume(rows):
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            codes = self._decode([r[1] for r in rows])
            if pending:
                pending.pop().result()
            # Slicing into planes (numpy, without the GIL) overlaps fetching the next rows.
            pending.append(worker.submit(index.append, ids, codes))

        with concurrent.futures.ThreadPoolExecutor(1, 'index-load') as worker:
            try:
                (top,), = self.store.scan('SELECT COALESCE(MAX(seq), 0) FROM changes',
                                          'SELECT id, codes FROM templates ORDER BY id', consume,
                                          (), self.scan_rows)
            finally:
                for future in pending:
                    future.result()
        self.index, self.seq = index, top
        self.loads += 1
        return None

    def _apply(self, rows):
        """Apply change-log rows (seq order): each template's last row decides whether it is
        held; its code is the one stored now (None when revoked since: then a later row says
        so)."""
        ids = np.fromiter((r[2] for r in rows), np.int64, len(rows))
        held = np.fromiter((r[1] == 'enroll' and r[3] is not None for r in rows), np.bool_,
                           len(rows))
        touched, first_from_end = np.unique(ids[::-1], return_index=True)
        last = len(rows) - 1 - first_from_end  # in id order, as np.unique sorts
        self.index.remove(touched)
        keep = last[held[last]]
        if len(keep):
            self.index.append(ids[keep], self._decode([rows[i][3] for i in keep]))
        return len(rows)

    def _decode(self, blobs):
        blob = b''.join(blobs)
        if len(blob) != len(blobs) * self.m:
            raise UserError(f'{self.store.where}: a stored code does not have m={self.m} bytes '
                            '(damaged database)')
        return np.frombuffer(blob, np.uint8).reshape(len(blobs), self.m)


class ChangeWatcher:
    """Calls `on_change()` when a change commits in a PostgreSQL gallery (LISTEN/NOTIFY), and
    every `poll_s` seconds while the listening connection is down; in a thread of its own."""

    def __init__(self, url, on_change, poll_s=1.0):
        self.url, self.on_change, self.poll_s = url, on_change, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='gallery-changes', daemon=True)

    def start(self):
        """Start listening; returns self."""
        self._thread.start()
        return self

    def stop(self):
        """Stop listening (returns within about `poll_s`)."""
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 5)

    def _run(self):
        import psycopg
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5,
                                     application_name='iomface-changes') as conn:
                    conn.execute(f'LISTEN {CHANNEL}')
                    self.on_change()  # what committed while nobody listened
                    while not self._stop.is_set():
                        if any(True for _ in conn.notifies(timeout=self.poll_s, stop_after=1)):
                            self.on_change()
            except psycopg.Error:
                if self._stop.wait(self.poll_s):
                    return
                self.on_change()  # poll: the per-request check would catch up anyway
