"""Attempt limits kept with the gallery (modules/deploy/attempts.py): consecutive failures, growing
lockouts, resets, unlock, audit rows, concurrent attempts, and the in-place upgrade of a schema-1
gallery. Both backends: an SQLite file and a throw-away PostgreSQL server."""
import concurrent.futures
import contextlib
import sqlite3
import threading

import numpy as np
import pytest

from modules.deploy.attempts import Limits, Locked, check, lockouts, settle, unlock
from modules.deploy.gallery import Gallery, NotEnrolled
from modules.deploy.store import SCHEMA_VERSION, is_postgres
from modules.utils import UserError

M, Q = 32, 8
LIMITS = Limits(max_failures=5, lockout_s=30.0, max_lockout_s=100.0)
T0 = 1_000_000.0  # a fixed clock: every time below is T0 + seconds


@pytest.fixture(params=['sqlite', 'postgres'])
def gallery(request, tmp_path):
    db = (str(tmp_path / 'g.sqlite') if request.param == 'sqlite' else
          request.getfixturevalue('pg_server').create_db())
    g = Gallery.create(db, str(tmp_path / 'tiny.yaml'), M, Q, 'f' * 64)
    g.enroll('alice', np.zeros((1, M), np.uint8), ['a.jpg'])
    g.enroll('bob', np.ones((1, M), np.uint8), ['b.jpg'])
    yield g
    g.close()


def events(gallery, name='alice'):
    return [event for _, event, who, _ in gallery.audit() if who == name]


def test_delays_start_at_the_limit_double_and_stop_at_the_cap():
    assert [LIMITS.delay(n) for n in range(1, 10)] == [0, 0, 0, 0, 30, 60, 100, 100, 100]
    assert Limits(max_failures=0).delay(50) == 0 and not Limits(max_failures=0).on
    assert Limits().delay(10 ** 6) == Limits().max_lockout_s  # no overflow far past the cap
    with pytest.raises(UserError, match='max_lockout_s >= lockout_s'):
        Limits(lockout_s=60, max_lockout_s=30)


def test_failures_lock_a_subject_and_a_match_resets(gallery):
    # A genuine user who fails 4 times and then matches is not locked and starts again at 0.
    assert [settle(gallery, 'subject', 'alice', False, LIMITS, 'verify', T0 + i)
            for i in range(4)] == [1, 2, 3, 4]
    assert settle(gallery, 'subject', 'alice', True, LIMITS, 'verify', T0 + 4) == 0
    assert [settle(gallery, 'subject', 'alice', False, LIMITS, 'verify', T0 + 5 + i)
            for i in range(4)] == [1, 2, 3, 4]
    assert 'lockout' not in events(gallery)
    # The 5th failure in a row locks for 30 s: the 6th attempt is refused, match or not, and
    # nothing is recorded for it.
    assert settle(gallery, 'subject', 'alice', False, LIMITS, 'verify', T0 + 10) == 5
    for matched in (False, True):
        with pytest.raises(Locked, match=r"'alice' \(5 in a row\): try again in 20 s") as err:
            settle(gallery, 'subject', 'alice', matched, LIMITS, 'verify', T0 + 20)
        assert err.value.retry_after == pytest.approx(20) and err.value.retry_after_header() == '20'
    with pytest.raises(Locked):
        check(gallery, 'subject', 'alice', T0 + 39.5)
    check(gallery, 'subject', 'bob', T0 + 20)  # other subjects are not affected
    assert lockouts(gallery, T0 + 20) == [('subject', 'alice', 5, T0 + 40)]
    # Once it has passed, one more failure locks for twice as long, then up to the cap.
    check(gallery, 'subject', 'alice', T0 + 40)
    assert settle(gallery, 'subject', 'alice', False, LIMITS, 'verify', T0 + 40) == 6
    with pytest.raises(Locked, match='try again in 60 s'):
        check(gallery, 'subject', 'alice', T0 + 40)
    assert settle(gallery, 'subject', 'alice', False, LIMITS, 'verify', T0 + 100) == 7
    assert lockouts(gallery, T0 + 100) == [('subject', 'alice', 7, T0 + 200)]  # the cap, 100 s
    # A match after the lockout resets the count.
    assert settle(gallery, 'subject', 'alice', True, LIMITS, 'verify', T0 + 200) == 0
    assert lockouts(gallery, T0 + 200) == []
    assert events(gallery) == ['enroll'] + ['failure'] * 9 + ['lockout'] + ['failure',
                                                                            'lockout'] * 2
    detail = [d for _, e, who, d in gallery.audit() if e == 'lockout'][0]
    assert detail == 'subject locked for 30 s after 5 failures in a row'


def test_identify_counts_per_token_without_naming_a_subject(gallery):
    limits = Limits(max_failures=2, lockout_s=30.0, max_lockout_s=100.0)
    for i in range(2):
        settle(gallery, 'token', 'abc123', False, limits, 'identify by token abc123', T0 + i)
    with pytest.raises(Locked, match='identify probes without a match from this token'):
        check(gallery, 'token', 'abc123', T0 + 2)
    rows = [(e, who, d) for _, e, who, d in gallery.audit() if e in ('failure', 'lockout')]
    assert rows == [('failure', None, 'identify by token abc123: no match (1 in a row)'),
                    ('failure', None, 'identify by token abc123: no match (2 in a row)'),
                    ('lockout', None, 'identify by token abc123 locked for 30 s after 2 '
                     'failures in a row')]


def test_unlock_revoke_and_unknown_names(gallery):
    for i in range(5):
        settle(gallery, 'subject', 'alice', False, LIMITS, 'verify', T0 + i)
    assert unlock(gallery, 'alice', 'gallery.py unlock', T0 + 5) == 5
    check(gallery, 'subject', 'alice', T0 + 5)
    assert settle(gallery, 'subject', 'alice', False, LIMITS, 'verify', T0 + 6) == 1
    last = gallery.audit()[-2]
    assert last[1:] == ('unlock', 'alice', '5 failure(s) cleared, lockout lifted by gallery.py '
                        'unlock')
    assert unlock(gallery, 'bob', 'token x', T0) == 0  # enrolled, never failed: nothing to clear
    with pytest.raises(NotEnrolled, match="'carol' is not enrolled"):
        unlock(gallery, 'carol', 'token x', T0)
    # Revoking deletes the count with the templates: whoever enrols under the name starts at 0.
    gallery.revoke('alice')
    gallery.enroll('alice', np.zeros((1, M), np.uint8), ['a2.jpg'])
    assert settle(gallery, 'subject', 'alice', False, LIMITS, 'verify', T0 + 7) == 1


def test_a_burst_of_concurrent_failures_cannot_pass_the_limit(gallery):
    """20 attempts at once from 4 connections (as from 4 service instances): exactly 5 are
    counted and answered, 15 refused."""
    start = threading.Barrier(4)

    def attempts_of_one_instance(_):
        g = gallery.reopen()  # in this thread: an SQLite connection belongs to its thread
        try:
            start.wait(timeout=60)
            out = []
            for _ in range(5):
                try:
                    out.append(settle(g, 'subject', 'bob', False, LIMITS, 'verify', T0))
                except Locked:
                    out.append('locked')
            return out
        finally:
            g.close()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [r for out in pool.map(attempts_of_one_instance, range(4)) for r in out]
    assert sorted(r for r in results if r != 'locked') == [1, 2, 3, 4, 5]
    assert results.count('locked') == 15
    assert events(gallery, 'bob').count('failure') == 5


def downgrade_to_schema_1(db):
    """Make a gallery look as IoMFace with schema 1 left it: no attempts table, the audit CHECK
    admitting init/enroll/revoke/rekey only."""
    old_check = "CHECK (event IN ('init', 'enroll', 'revoke', 'rekey'))"
    if is_postgres(db):
        import psycopg
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute('DROP TABLE attempts')
            conn.execute('ALTER TABLE audit DROP CONSTRAINT audit_event_check')
            conn.execute(f'ALTER TABLE audit ADD CONSTRAINT audit_event_check {old_check}')
            conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        return
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.executescript(f"""BEGIN; DROP TABLE attempts;
            CREATE TABLE audit_old (id INTEGER PRIMARY KEY, time REAL NOT NULL,
                                    event TEXT NOT NULL {old_check}, name TEXT, detail TEXT NOT NULL);
            INSERT INTO audit_old SELECT * FROM audit; DROP TABLE audit;
            ALTER TABLE audit_old RENAME TO audit;
            UPDATE meta SET value = '1' WHERE key = 'schema_version'; COMMIT;""")


def test_a_schema_1_gallery_is_upgraded_in_place(gallery):
    db, before = gallery.db_path, gallery.audit()
    gallery.close()
    downgrade_to_schema_1(db)
    for _ in range(2):  # the first open upgrades; the second finds nothing to do
        g = Gallery.open(db)
        assert g.meta['schema_version'] == str(SCHEMA_VERSION)
        assert g.audit() == before and 'attempts' in g.store.tables()
        g.close()
    g = Gallery.open(db)
    try:
        assert g.store.read("SELECT value FROM meta WHERE key = 'schema_version'") == [
            (str(SCHEMA_VERSION),)]
        for i in range(5):
            settle(g, 'subject', 'alice', False, LIMITS, 'verify', T0 + i)
        assert unlock(g, 'alice', 'test', T0 + 5) == 5
        assert events(g)[-7:] == ['failure'] * 5 + ['lockout', 'unlock']
        with pytest.raises(UserError, match='CHECK|check'):  # the constraint is still there
            with g.store.write() as conn:
                conn.execute("INSERT INTO audit (time, event, name, detail) VALUES "
                             "(0, 'bogus', NULL, '')")
    finally:
        g.close()
