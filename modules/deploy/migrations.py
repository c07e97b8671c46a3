"""Upgrades of galleries written by an older IoMFace, in place when they are opened.

One function per schema version step (`_upgrade_to_<version>`), each run in one write transaction
that first asks the database its version again (several processes may open an old gallery at
once: the first upgrades it, the others find the work done). `upgrade` chains the steps from
the gallery's version up to `SCHEMA_VERSION`.
"""
from modules.deploy.store import (
    AUDIT_CHECK,
    SCHEMA_VERSION,
    SQLITE_AUDIT,
    SQLiteStore,
    attempts_table,
)


def _upgrade_to_2(store, conn):
    """Version 2: the attempt counters, and audit events for failures, lockouts and unlocks."""
    if isinstance(store, SQLiteStore):
        conn.execute(attempts_table('REAL'))
        # SQLite cannot change a CHECK constraint: copy the audit rows into a new table with the
        # new constraint, in this same transaction (all or nothing).
        conn.execute(SQLITE_AUDIT.format(table='audit_v2'))
        conn.execute('INSERT INTO audit_v2 (id, time, event, name, detail) '
                     'SELECT id, time, event, name, detail FROM audit')
        conn.execute('DROP TABLE audit')
        conn.execute('ALTER TABLE audit_v2 RENAME TO audit')
    else:
        conn.execute(attempts_table('DOUBLE PRECISION'))
        # The name PostgreSQL gave the column's CHECK when the table was made.
        conn.execute('ALTER TABLE audit DROP CONSTRAINT audit_event_check')
        conn.execute(f'ALTER TABLE audit ADD CONSTRAINT audit_event_check {AUDIT_CHECK}')


def _upgrade_to_3(store, conn):
    """Version 3: the change log (`modules.deploy.changelog`; on PostgreSQL with its NOTIFY
    trigger). Templates already stored need no log rows: a new index loads them all."""
    for statement in store.CHANGES_DDL:
        conn.execute(statement)


STEPS = {2: _upgrade_to_2, 3: _upgrade_to_3}


def _version(value):
    return int(value) if value is not None else 1


def upgrade(store, meta):
    """Bring the gallery of `store` (its meta rows `meta`, updated) up to SCHEMA_VERSION."""
    for target in range(_version(meta.get('schema_version')) + 1, SCHEMA_VERSION + 1):
        with store.write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if _version(row and row[0]) < target:
                STEPS[target](store, conn)
                conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                             (str(target),))
        meta['schema_version'] = str(target)
    return meta
