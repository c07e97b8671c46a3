"""Schema upgrades: a gallery written by an older IoMFace is brought up to `SCHEMA_VERSION` in place
when it is opened, one step per version, all in one write transaction (writers of other
processes wait, then see the new tables; an older IoMFace then refuses the gallery as newer than
it reads, so no writer bypasses what the new schema maintains)."""
from modules.deploy.store import SCHEMA_VERSION, check_schema_version


def upgrade(store, meta):
    """Bring the gallery of an open store up to SCHEMA_VERSION; its meta rows afterwards."""
    if check_schema_version(store.where, meta) >= SCHEMA_VERSION:
        return meta
    with store.write() as conn:
        # Read again inside the transaction: another process may have upgraded meanwhile.
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 1
        for target, step in _UPGRADES:
            if version < target:
                step(store, conn)
    return dict(store.read('SELECT key, value FROM meta'))


def _set_schema_version(conn, version):
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) "
                 'DO UPDATE SET value = excluded.value', (str(version),))


def _upgrade_to_3(store, conn):
    """Schema 1 or 2 -> 3: the change log (`modules.deploy.changelog`; on PostgreSQL with its
    NOTIFY trigger). Templates already stored need no log rows: a new index loads them all."""
    for statement in store.CHANGES_DDL:
        conn.execute(statement)
    _set_schema_version(conn, 3)


# (version, step) in order: each step takes a gallery of any older version to its own.
_UPGRADES = ((3, _upgrade_to_3),)
