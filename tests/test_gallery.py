"""Gallery: storage rules, reliability (concurrent writers, SIGKILL, corruption), revocability, CLI.
The storage tests run on both backends: an SQLite file and a throw-away PostgreSQL server
(tests/pg_server.py, skipped when PostgreSQL is not installed)."""
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from modules.deploy.decision import decision_threshold
from modules.deploy.gallery import Gallery
from modules.deploy.keys import read_key
from modules.deploy.store import SCHEMA_VERSION, SQLiteStore
from modules.utils import UserError
from tests.helpers.gallery import gallery_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='-1')
M, Q = 32, 8


@pytest.fixture(params=['sqlite', 'postgres'])
def new_db(request, tmp_path):
    """new_db(name) -> a new database: an SQLite path in tmp_path or a fresh PostgreSQL database."""
    if request.param == 'sqlite':
        return lambda name='g.sqlite': str(tmp_path / name)
    server = request.getfixturevalue('pg_server')
    return lambda name=None: server.create_db()


def new_gallery(tmp_path, db, key_mode='application'):
    # The config's folder is tmp_path: a PostgreSQL gallery's key file goes there.
    return Gallery.create(db, str(tmp_path / 'tiny.yaml'), M, Q, 'f' * 64, key_mode)


def float_run_length(data, low=1e-6, high=1e6):
    """Longest run of consecutive plausible float32 values (finite, low <= |x| <= high) at any
    4-byte alignment of `data`: an embedding stored as float32 shows up as a long run."""
    longest = 0
    for offset in range(4):
        usable = (len(data) - offset) // 4 * 4
        values = np.frombuffer(data[offset:offset + usable], '<f4')
        with np.errstate(invalid='ignore', over='ignore'):
            ok = np.isfinite(values) & (np.abs(values) >= low) & (np.abs(values) <= high)
        # Run lengths of True: position minus the position of the last False before it.
        idx = np.arange(ok.size)
        last_false = np.maximum.accumulate(np.where(~ok, idx, -1))
        runs = np.where(ok, idx - last_false, 0)
        longest = max(longest, int(runs.max(initial=0)))
    return longest




def test_storage_rules_key_file_and_refusals(tmp_path, new_db):
    gallery = new_gallery(tmp_path, new_db())
    db, kpath = gallery.db_path, gallery.key_file
    assert os.path.dirname(kpath) == str(tmp_path)
    assert stat.S_IMODE(os.stat(kpath).st_mode) == 0o600
    codes = np.random.default_rng(0).integers(0, Q, (3, M))
    assert gallery.enroll('alice', codes[:2], ['a1.jpg', 'a2.jpg']) == 2
    assert gallery.enroll('alice', codes[2:], ['a3.jpg'], only_new=True) == 0
    assert gallery.enroll('bob', codes[2:], ['b1.jpg']) == 1
    assert gallery.verify('alice', codes[1]) == 0
    assert gallery.identify(codes[2], top_k=2)[0][:2] == ('bob', 0)
    with pytest.raises(UserError, match='already exists'):
        new_gallery(tmp_path, db)
    with pytest.raises(UserError, match="'carol' is not enrolled"):
        gallery.verify('carol', codes[0])
    with pytest.raises(UserError, match='values in'):
        gallery.enroll('dave', np.full((1, M), Q), ['d.jpg'])
    with pytest.raises(UserError, match='another model'):
        gallery.check_model('0' * 64, M, Q)
    # The key never enters the database; a world-readable, missing or foreign key is refused.
    key = read_key(kpath)
    assert f'{key:x}'.encode() not in gallery_bytes(db)
    os.chmod(kpath, 0o644)
    with pytest.raises(UserError, match='accessible by other users'):
        Gallery.open(db)
    os.chmod(kpath, 0o600)
    other = new_gallery(tmp_path, new_db('other.sqlite'))
    os.replace(other.key_file, kpath)
    with pytest.raises(UserError, match='is not the key of'):
        Gallery.open(db)
    with pytest.raises(UserError, match='key file not found'):
        Gallery.open(other.db_path)
    events = [row[1] for row in gallery.audit()]
    assert events == ['init', 'enroll', 'enroll']


def test_rekey_deletes_every_code_and_survives_a_crash_before_the_rename(tmp_path, new_db):
    gallery = new_gallery(tmp_path, new_db())
    gallery.enroll('alice', np.zeros((2, M), np.uint8), ['a', 'b'])
    old_id = gallery.meta['key_id']
    assert gallery.rekey() == 2 and gallery.count() == 0 and gallery.meta['key_id'] != old_id
    assert Gallery.open(gallery.db_path).meta['key_id'] == gallery.meta['key_id']
    assert [row[1] for row in gallery.audit()][-1] == 'rekey'
    # Simulate a crash after the database commit but before <key>.new replaced <key>.
    kpath = gallery.key_file
    os.replace(kpath, kpath + '.new')
    with open(kpath, 'w') as fh:
        fh.write('1234\n')
    os.chmod(kpath, 0o600)
    reopened = Gallery.open(gallery.db_path)
    assert reopened.key == gallery.key and not os.path.exists(kpath + '.new')


_WRITER = """
import sys
import numpy as np
from modules.deploy.gallery import Gallery
db, worker = sys.argv[1], int(sys.argv[2])
gallery = Gallery.open(db)
for i in range(40):
    name = f'w{worker}_s{i:02d}'
    gallery.enroll(name, np.random.default_rng([worker, i]).integers(0, 8, (2, 32)),
                   [name + '_a', name + '_b'])
"""


def test_four_processes_enrolling_at_once_lose_nothing(tmp_path, new_db):
    gallery = new_gallery(tmp_path, new_db())
    procs = [subprocess.Popen([sys.executable, '-c', _WRITER, gallery.db_path, str(w)], env=ENV,
                              stderr=subprocess.PIPE, text=True) for w in range(4)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert gallery.count() == 4 * 40 * 2
    for w in range(4):
        for i in range(40):
            expected = np.random.default_rng([w, i]).integers(0, 8, (2, 32))
            np.testing.assert_array_equal(gallery.templates_of(f'w{w}_s{i:02d}'), expected)
    assert sum(row[1] == 'enroll' for row in gallery.audit()) == 160


_BULK = """
import sys, time
import numpy as np
from modules.deploy.gallery import Gallery
from modules.deploy.hashing import enroll_folders
gallery = Gallery.open(sys.argv[1])
folders = [(f's{i:03d}', [f's{i:03d}/{j}.jpg' for j in range(3)]) for i in range(150)]

def load(path):
    time.sleep(0.004)
    return np.frombuffer(path.encode().ljust(32, b'.'), np.uint8) % 8

summary = enroll_folders(gallery, folders, lambda faces: faces, load, progress=False)
print(summary['enrolled'], summary['skipped'])
"""


def test_bulk_enrol_killed_with_sigkill_resumes_with_every_subject_once(tmp_path, new_db):
    gallery = new_gallery(tmp_path, new_db())
    proc = subprocess.Popen([sys.executable, '-c', _BULK, gallery.db_path], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while gallery.count() < 60 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    done = len(gallery.enrolled_names())
    assert 20 <= done < 150
    assert gallery.count() == 3 * done  # no half-written subject
    out = subprocess.run([sys.executable, '-c', _BULK, gallery.db_path], env=ENV, timeout=300,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    enrolled, skipped = map(int, out.stdout.split())
    assert skipped == done and enrolled == 150 - done
    rows = gallery.subjects()
    assert [r[0] for r in rows] == [f's{i:03d}' for i in range(150)] and {r[1] for r in rows} == {3}
    if isinstance(gallery.store, SQLiteStore):
        assert sqlite3.connect(gallery.db_path).execute('PRAGMA integrity_check').fetchone() == \
            ('ok',)


_ENROLLER = """
import sys
import numpy as np
from modules.deploy.gallery import Gallery, KeyChanged
gallery = Gallery.open(sys.argv[1])
refused, after = 0, 0
for i in range(20000):  # until 5 enrolments after the 6th rekey
    name = f'e{sys.argv[2]}_{i:04d}'
    try:  # codes 'made' under the key this process holds, which a rekey elsewhere replaces
        gallery.enroll(name, np.zeros((1, 32), np.uint8), [name])
    except KeyChanged:
        refused += 1
        gallery.refresh()  # the new key, from the key file
    rekeys = gallery._read("SELECT COUNT(*) FROM audit WHERE event = 'rekey'")[0][0]
    after += rekeys == 6
    if after > 5:
        break
print(refused)
"""
_REKEYER = """
import sys, time
from modules.deploy.gallery import Gallery
gallery = Gallery.open(sys.argv[1])
deadline = time.time() + 120
while time.time() < deadline and gallery._read(  # every enroller is running
        'SELECT COUNT(DISTINCT substr(name, 1, 2)) FROM templates')[0][0] < 3:
    time.sleep(0.01)
for _ in range(6):
    time.sleep(0.05)
    gallery.rekey()
"""


def test_concurrent_rekey_and_enrolment_never_leave_codes_of_two_keys(tmp_path, new_db):
    gallery = new_gallery(tmp_path, new_db())
    procs = [subprocess.Popen([sys.executable, '-c', code, gallery.db_path, str(w)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w, code in enumerate([_ENROLLER] * 3 + [_REKEYER])]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outs]
    refused = sum(int(out) for out, _ in outs[:3])
    gallery.refresh()
    held = {row[0] for row in gallery._read('SELECT DISTINCT key_id FROM templates')}
    print(f'{refused} enrolments refused as made under a replaced key; key ids held: {held}')
    assert held == {gallery.meta['key_id']}
    assert refused >= 3  # each enroller met a rekey between hashing and writing
    assert [row[1] for row in gallery.audit()].count('rekey') == 6
    assert gallery.key == read_key(gallery.key_file)


def test_postgres_refusals_newer_schema_and_connection_errors(tmp_path, pg_server):
    import psycopg
    gallery = new_gallery(tmp_path, pg_server.create_db())
    newer = SCHEMA_VERSION + 1
    with psycopg.connect(gallery.db_path, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(newer),))
    with pytest.raises(UserError, match=f'schema version {newer} is newer than this IoMFace'):
        Gallery.open(gallery.db_path)
    with pytest.raises(UserError, match='keep the password out of the URL'):
        Gallery.open(f'postgresql://postgres:secret@127.0.0.1:{pg_server.port}/postgres')
    with pytest.raises(UserError, match='no gallery in this database'):
        Gallery.open(pg_server.url('postgres'))
    gallery_py = os.path.join(ROOT, 'gallery.py')
    bad = {'does not exist': pg_server.url('nosuchdb'),
           'role "nobody_here" does not exist':
               f'postgresql://nobody_here@127.0.0.1:{pg_server.port}/postgres',
           'Connection refused': 'postgresql://postgres@127.0.0.1:1/postgres'}
    procs = {why: subprocess.Popen([sys.executable, gallery_py, 'list', '--db', url], env=ENV,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for why, url in bad.items()}
    # serve.py says the same before loading anything.
    procs['serve.py: Connection refused'] = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'serve.py'), '--db', bad['Connection refused']],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for why, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and err.count('\n') == 1, err
        assert 'cannot connect to PostgreSQL' in err and why.split(': ')[-1] in err
        assert 'Traceback' not in err


def test_corrupted_database_gives_one_clear_error(tmp_path):
    gallery = new_gallery(tmp_path, str(tmp_path / 'g.sqlite'))
    gallery.enroll('alice', np.zeros((1, M), np.uint8), ['a'])
    gallery.close()
    with sqlite3.connect(gallery.db_path) as conn:
        conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    with open(gallery.db_path, 'r+b') as fh:
        fh.write(b'\x13' * 100)  # the SQLite header
    with pytest.raises(UserError, match='not a usable gallery database'):
        Gallery.open(gallery.db_path)
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'gallery.py'), 'list', '--db',
                          gallery.db_path], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count('\n') == 1
    assert 'not a usable gallery database' in out.stderr and 'Traceback' not in out.stderr
    (tmp_path / 'plain.sqlite').write_bytes(b'')
    with pytest.raises(UserError, match='tables missing'):
        Gallery.open(str(tmp_path / 'plain.sqlite'))


def test_float_scan_finds_an_embedding_and_the_gallery_holds_none(tmp_path):
    embedding = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    embedding /= np.linalg.norm(embedding)
    with sqlite3.connect(tmp_path / 'leaky.sqlite') as conn:
        conn.execute('CREATE TABLE t (name TEXT, v BLOB)')
        conn.execute('INSERT INTO t VALUES (?, ?)', ('alice', embedding.tobytes()))
    assert float_run_length((tmp_path / 'leaky.sqlite').read_bytes()) >= 512
    gallery = new_gallery(tmp_path, str(tmp_path / 'g.sqlite'))
    codes = np.random.default_rng(2).integers(0, Q, (300, M))
    gallery.enroll_bulk([f'p{i}' for i in range(300)], codes)
    assert float_run_length(gallery_bytes(gallery.db_path)) < 64


def test_threshold_from_the_evaluation_results(tmp_path, monkeypatch):
    from modules.evaluations import verification_metrics, write_report
    rng = np.random.default_rng(0)
    distances = np.concatenate([rng.integers(0, 12, 300), rng.integers(8, 32, 300)]).astype(float)
    issame = np.arange(600) < 300
    metrics = verification_metrics(distances, issame)
    monkeypatch.chdir(tmp_path)
    cfg = {'sub_name': 'run'}
    with pytest.raises(UserError, match='run test_twostage_iom.py'):
        decision_threshold(cfg)
    write_report({'lfw': metrics}, 'logs/run', 'iom_Hamming')
    threshold, source = decision_threshold(cfg)
    assert threshold == metrics['eer_threshold'] and 'EER threshold on lfw' in source
    far_eer = np.mean(distances[~issame] <= threshold)
    frr_eer = np.mean(distances[issame] > threshold)
    assert abs(far_eer - frr_eer) < 0.05
    strict, _ = decision_threshold(cfg, far=0.01)
    assert strict < threshold and np.mean(distances[~issame] <= strict) <= 0.01
    assert np.mean(distances[~issame] <= strict + 1) > 0.01  # the largest such threshold
    assert decision_threshold(cfg, threshold=3.0) == (3.0, 'given with --threshold')


# ---------------------------------------------------------------------------------------------
# With the hashing model (a tiny seeded MobileNetV2, see tests/tiny_iom.py).
@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    from tests.helpers.tiny_iom import make_tiny_model, synthetic_faces, write_photos
    work = tmp_path_factory.mktemp('gallery')
    cfg_path = make_tiny_model(str(work))
    faces, gids = synthetic_faces(6, 3)
    people = work / 'people'
    for person, name in ((0, 'alice'), (1, 'bob')):
        write_photos(str(people / name), faces[gids == person][:2], ['1.jpg', '2.jpg'])
    (people / 'bob' / 'broken.jpg').write_bytes(b'not a jpeg')
    write_photos(str(work), faces[gids == 2][:1], ['stranger.jpg'])
    return work, cfg_path, faces, gids


def gallery_cli(work, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'gallery.py'), *args], cwd=work,
                          env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('backend', ['sqlite', 'postgres'])
def test_cli_enrol_verify_identify(tiny, backend, request):
    work, cfg_path, _, _ = tiny
    db = 'g.sqlite' if backend == 'sqlite' else request.getfixturevalue('pg_server').create_db()
    out = gallery_cli(work, 'init', '--cfg_path', cfg_path, '--db', db)
    assert out.returncode == 0, out.stderr
    key_file = ('g.sqlite.key' if backend == 'sqlite' else
                os.path.join(os.path.dirname(os.path.abspath(cfg_path)),
                             db.rsplit('/', 1)[1] + '.key'))
    assert f'key file {key_file} (mode 0600' in out.stdout
    assert stat.S_IMODE(os.stat(work / key_file).st_mode) == 0o600
    out = gallery_cli(work, 'enroll_dir', '--db', db, '--input_dir', 'people',
                      '--noprogress')
    assert out.returncode == 0, out.stderr
    assert '2 subjects: 2 enrolled (4 templates)' in out.stdout and 'broken.jpg' in out.stdout
    out = gallery_cli(work, 'verify', '--db', db, '--name', 'alice', '--image',
                      'people/alice/1.jpg', '--threshold', '1')
    assert out.returncode == 0 and 'distance 0 / 32' in out.stdout and 'MATCH' in out.stdout
    # Someone never enrolled: the closest templates are listed, none within the threshold.
    out = gallery_cli(work, 'identify', '--db', db, '--image', 'stranger.jpg',
                      '--threshold', '1', '--top_k', '3')
    assert out.returncode == 1 and 'MATCH' not in out.stdout, out.stderr
    ranks = [line.split() for line in out.stdout.splitlines() if line.strip()[:2] in ('1.', '3.')]
    assert len(ranks) == 2 and {ranks[0][1], ranks[1][1]} <= {'alice', 'bob'}
    assert 1 < int(ranks[0][3]) <= int(ranks[1][3])


def test_rekey_revokes_old_codes_and_another_model_is_refused(tiny, monkeypatch):
    from modules.config import STAGE2_REQUIRED, load_config
    from modules.deploy.hashing import Hasher
    from modules.evaluations import verification_metrics
    from tests.helpers.tiny_iom import make_tiny_model
    work, cfg_path, faces, gids = tiny
    monkeypatch.chdir(work)
    cfg = load_config(cfg_path, STAGE2_REQUIRED)
    gallery = Gallery.create(str(work / 'r.sqlite'), cfg_path, M, Q, Hasher(cfg, None).fingerprint)
    old = Hasher(cfg, gallery.key)
    gallery.check_model(old.fingerprint, M, Q)
    old_codes = old.codes(faces)
    first, second = np.triu_indices(len(gids), k=1)
    hamming = np.count_nonzero(old_codes[first] != old_codes[second], axis=1)
    threshold = verification_metrics(hamming, gids[first] == gids[second])['eer_threshold']
    gallery.enroll_bulk([f'id{g}' for g in gids], old_codes)
    gallery.rekey()
    new_codes = Hasher(cfg, gallery.key).codes(faces)
    cross = np.count_nonzero(old_codes != new_codes, axis=1)
    print(f'same photo across keys: Hamming {cross.min()}..{cross.max()} of {M} '
          f'(chance {M * (1 - 1 / Q):.0f}), EER threshold {threshold}')
    assert cross.min() > threshold and abs(cross.mean() - M * (1 - 1 / Q)) < 0.15 * M
    assert gallery.count() == 0
    with pytest.raises(UserError, match="'id0' is not enrolled"):
        gallery.verify('id0', new_codes[0])
    # Another model (other weights, same config) is refused by its fingerprint.
    other_dir = work / 'other'
    other_dir.mkdir()
    make_tiny_model(str(other_dir), seed=1)
    monkeypatch.chdir(other_dir)
    with pytest.raises(UserError, match='made by another model'):
        gallery.check_model(Hasher(cfg, gallery.key).fingerprint, M, Q)


# ---------------------------------------------------------------------------------------------
# Subject-held keys.
def test_subject_key_gallery_stores_no_key_and_refuses_what_needs_one(tmp_path, new_db):
    from modules.deploy.keys import key_id, new_key
    gallery = new_gallery(tmp_path, new_db('s.sqlite'), 'subject')
    assert gallery.subject_keys and gallery.key is None and not os.path.exists(gallery.key_file)
    codes = np.random.default_rng(0).integers(0, Q, (2, M))
    alice, bob = new_key(), new_key()
    gallery.enroll('alice', codes[:1], ['a.jpg'], subject_key=alice)
    gallery.enroll('alice', codes[1:], ['b.jpg'], subject_key=alice)  # same key: added
    gallery.enroll('bob', codes[:1], ['c.jpg'], subject_key=bob)
    assert gallery.subject_key_id('alice') == key_id(alice) != gallery.subject_key_id('bob')
    assert gallery.key_matches('alice', alice) and not gallery.key_matches('alice', bob)
    with pytest.raises(UserError, match='enrolled under another key'):
        gallery.enroll('alice', codes[:1], ['d.jpg'], subject_key=bob)
    with pytest.raises(UserError, match="with the subject's key"):
        gallery.enroll('carol', codes[:1], ['e.jpg'])
    for refused in (lambda: gallery.identify(codes[0]), gallery.rekey,
                    lambda: gallery.enroll_bulk(['x'], codes[:1])):
        with pytest.raises(UserError, match='subject-key gallery'):
            refused()
    gallery.close()
    reopened = Gallery.open(gallery.db_path)
    assert reopened.subject_keys and reopened.count() == 3
    assert reopened.verify('alice', codes[1]) == 0
    reopened.revoke('alice')
    reopened.close()
    data = gallery_bytes(gallery.db_path)
    for key in (alice, bob):
        for text in (f'{key:x}', f'{key}'):
            assert text.encode() not in data
        assert key.to_bytes(16, 'little') not in data and key.to_bytes(16, 'big') not in data


def test_cli_subject_keys_verify_with_right_wrong_and_missing_key(tiny):
    from modules.deploy.keys import new_key, write_key
    work, cfg_path, _, _ = tiny
    out = gallery_cli(work, 'init', '--cfg_path', cfg_path, '--db', 'subj.sqlite',
                      '--key_mode', 'subject')
    assert out.returncode == 0 and 'no key' in out.stdout, out.stderr
    assert not os.path.exists(work / 'subj.sqlite.key')
    out = gallery_cli(work, 'enroll', '--db', 'subj.sqlite', '--name', 'alice', '--image',
                      'people/alice/1.jpg')
    assert out.returncode == 2 and 'needs --key_out' in out.stderr
    out = gallery_cli(work, 'enroll', '--db', 'subj.sqlite', '--name', 'alice', '--image',
                      'people/alice/1.jpg', '--key_out', 'alice.key')
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(os.stat(work / 'alice.key').st_mode) == 0o600
    key_hex = (work / 'alice.key').read_text().strip()
    assert key_hex.encode() not in gallery_bytes(str(work / 'subj.sqlite'))
    write_key(str(work / 'guess.key'), new_key())
    verify = ('verify', '--db', 'subj.sqlite', '--name', 'alice', '--image',
              'people/alice/1.jpg', '--threshold', '1')
    right = gallery_cli(work, *verify, '--subject_key', 'alice.key')
    assert right.returncode == 0 and 'distance 0 / 32' in right.stdout, right.stderr
    # A wrong key never matches, even with a threshold that would accept any code.
    wrong = gallery_cli(work, *verify[:-1], '32', '--subject_key', 'guess.key')
    assert wrong.returncode == 1 and 'NO MATCH (the key is not' in wrong.stdout, wrong.stderr
    missing = gallery_cli(work, *verify)
    assert missing.returncode == 2 and 'needs --subject_key' in missing.stderr
    identify = gallery_cli(work, 'identify', '--db', 'subj.sqlite', '--image', 'stranger.jpg')
    assert identify.returncode == 2 and 'identify is not possible' in identify.stderr
    assert len(identify.stderr.strip().splitlines()) == 1
