"""What a gallery database holds, read from outside the gallery code."""
import os


def gallery_bytes(db):
    """Everything the database stores: the SQLite files, or every row of every table."""
    from modules.deploy.store import TABLES, is_postgres
    if not is_postgres(db):
        return b''.join(open(p, 'rb').read() for p in (db, db + '-wal') if os.path.exists(p))
    import psycopg
    out = []
    with psycopg.connect(db) as conn:
        for table in TABLES:
            for row in conn.execute(f'SELECT * FROM {table}'):
                out += [v if isinstance(v, bytes) else str(v).encode() for v in row]
    return b'\n'.join(out)
