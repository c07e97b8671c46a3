"""serve.py's front door with its defaults: answers hold decisions, never distances; consecutive
failures lock a subject out (429 with Retry-After) on every instance of the gallery and after a
restart; a match resets the count; admins unlock (HTTP and gallery.py); identify probes are
bounded per token; the per-token bucket. Two instances (A, B) on one gallery, SQLite and
PostgreSQL, tiny seeded model (tests/helpers/tiny_iom.py)."""
import contextlib
import io
import os
import re
import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest

from modules.deploy.gallery import Gallery
from modules.deploy.service.bucket import TokenBucket
from tests.helpers.service import ENV, ROOT, Server, bearer, jpeg, token

# The genuine photo is the enrolled one (distance 0); under the tiny model other photos differ
# in 5-16 of 32 indices: at 2, every other photo is a certain non-match.
THRESHOLD = 2
LOCKOUT_S = 600  # far longer than any test: a lockout cannot end while it is checked
IDENTIFY_FAILURES = 3  # a small bound, so it is reached below the bucket's default burst


@pytest.fixture(scope='module', params=['sqlite', 'postgres'])
def two(tmp_path_factory, request):
    from tests.helpers.tiny_iom import make_tiny_model, synthetic_faces
    work = str(tmp_path_factory.mktemp('limits'))
    cfg_path = make_tiny_model(work)
    faces, _ = synthetic_faces(12, 1)
    db = (os.path.join(work, 'g.sqlite') if request.param == 'sqlite' else
          request.getfixturevalue('pg_server').create_db('limits'))
    flags = ('--threshold', str(THRESHOLD), '--lockout_s', str(LOCKOUT_S),
             '--max_identify_failures', str(IDENTIFY_FAILURES))
    # A has the default bucket; B a bucket of 3 requests refilled once in 100 s.
    a = Server(work, db, '--cfg_path', cfg_path, *flags)
    servers = {'a': a}
    try:
        servers['b'] = Server(work, db, *flags, '--rate', '0.01', '--burst', '3')
        state = {'work': work, 'db': db, 'flags': flags, 'servers': servers,
                 'admin': token(work, db, 'admin'), 'client': token(work, db, 'client'),
                 'photos': [jpeg(f) for f in faces]}
        enrol_and_pick_impostors(state, cfg_path)
        yield state
    finally:
        for server in servers.values():
            server.stop(signal.SIGKILL)


def enrol_and_pick_impostors(state, cfg_path):
    """Enrol subjects s0..s3 with photos 0..3; for each, the photos among 4..11 whose codes (the
    model's, in this process) are farther than the threshold: certain non-matches; and the
    strangers, photos that match none of them."""
    from modules.align import read_photo
    from modules.config import STAGE2_REQUIRED, load_config
    from modules.deploy.hashing import Hasher
    url, photos = state['servers']['a'].url, state['photos']
    for i in range(4):
        r = httpx.post(f'{url}/v1/subjects/s{i}/templates', files={'image': ('p.jpg', photos[i])},
                       headers=bearer(state['admin']))
        assert r.status_code == 201, r.text
    gallery = Gallery.open(state['db'])
    with contextlib.chdir(state['work']):  # the checkpoints are found from there
        codes = Hasher(load_config(cfg_path, STAGE2_REQUIRED), gallery.key).codes(
            np.stack([read_photo(io.BytesIO(p)) for p in photos]))
    gallery.close()
    distances = np.count_nonzero(codes[:4, None] != codes[None, 4:], axis=2)
    state['impostors'] = [[photos[4 + j] for j in np.flatnonzero(row > THRESHOLD)]
                          for row in distances]
    state['strangers'] = [photos[4 + j] for j in np.flatnonzero((distances > THRESHOLD).all(0))]
    assert all(len(found) >= 6 for found in state['impostors']) and state['strangers'], distances


def verify(url, tok, name, photo):
    return httpx.post(url + '/v1/verify', data={'name': name}, files={'image': ('p.jpg', photo)},
                      headers=bearer(tok), timeout=60)


def refused(r, *words):
    """True when `r` is a 429 with a Retry-After of whole seconds and a detail saying `words`."""
    assert r.status_code == 429, r.text
    wait = int(r.headers['retry-after'])
    assert 1 <= wait <= LOCKOUT_S and all(w in r.json()['detail'] for w in words), r.text
    return True


def subject_events(db, name):
    gallery = Gallery.open(db)
    try:
        return [(event, detail) for _, event, who, detail in gallery.audit() if who == name]
    finally:
        gallery.close()


def test_answers_hold_decisions_not_distances(two):
    url, client, photos = two['servers']['a'].url, two['client'], two['photos']
    health = httpx.get(url + '/healthz').json()
    assert health['expose_scores'] is False
    assert health['limits'] == {'max_failures': 5, 'lockout_s': LOCKOUT_S, 'max_lockout_s': 3600,
                                'max_identify_failures': IDENTIFY_FAILURES, 'rate': 10,
                                'burst': 20}
    assert verify(url, client, 's0', photos[0]).json() == {'name': 's0', 'match': True}
    assert verify(url, client, 's0', two['impostors'][0][0]).json() == {'name': 's0',
                                                                          'match': False}
    assert verify(url, client, 's0', photos[0]).json()['match']  # the count starts again at 0
    found = httpx.post(url + '/v1/identify', data={'top_k': '4'},
                       files={'image': ('p.jpg', photos[1])}, headers=bearer(client)).json()
    assert found == {'candidates': [{'name': 's1'}]}  # only who matches: no distance, no rank
    assert '[*] answers: decisions only; limits: 5 failures per subject' in \
        two['servers']['a'].log()


def test_sixth_failure_is_refused_by_every_instance_and_after_a_restart(two):
    servers, client, name = two['servers'], two['client'], 's2'
    for photo in two['impostors'][2][:5]:
        r = verify(servers['a'].url, client, name, photo)
        assert r.status_code == 200 and r.json() == {'name': name, 'match': False}, r.text
    # The 6th attempt is refused whatever its photo (here the genuine one): on A, on B ...
    assert refused(verify(servers['a'].url, client, name, two['photos'][2]), 'too many failed',
                   "'s2' (5 in a row)")
    assert refused(verify(servers['b'].url, client, name, two['photos'][2]), 'too many failed')
    # ... and on A started again.
    assert servers['a'].stop() == 0
    servers['a'] = Server(two['work'], two['db'], *two['flags'])
    assert refused(verify(servers['a'].url, client, name, two['photos'][2]), 'too many failed')
    events = subject_events(two['db'], name)
    assert [e for e, _ in events] == ['enroll'] + ['failure'] * 5 + ['lockout']
    tid = re.search(r'token (\w+):', events[1][1]).group(1)
    assert events[1][1] == f'verify by token {tid}: no match (1 in a row)'
    assert events[-1][1] == f'subject locked for {LOCKOUT_S} s after 5 failures in a row'


def test_admins_unlock_over_http_and_with_gallery_py(two):
    url, client, admin, name = two['servers']['a'].url, two['client'], two['admin'], 's2'
    path = f'{url}/v1/subjects/{name}/lockout'
    assert httpx.delete(path, headers=bearer(client)).status_code == 403
    assert httpx.delete(f'{url}/v1/subjects/nobody/lockout', headers=bearer(admin)).status_code \
        == 404
    r = httpx.delete(path, headers=bearer(admin))
    assert r.status_code == 200 and r.json() == {'name': name, 'failures_cleared': 5}, r.text
    assert verify(url, client, name, two['photos'][2]).json()['match']
    for photo in two['impostors'][2][:5]:
        assert verify(url, client, name, photo).status_code == 200
    assert refused(verify(url, client, name, two['photos'][2]), 'too many failed')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'gallery.py'), 'unlock', '--db',
                          two['db'], '--name', name], cwd=two['work'], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f'[*] unlocked {name}: 5 failed attempt(s) in a row cleared\n'
    assert verify(url, client, name, two['photos'][2]).json()['match']
    unlocks = [d for e, d in subject_events(two['db'], name) if e == 'unlock']
    assert len(unlocks) == 2 and unlocks[0].startswith('5 failure(s) cleared, lockout lifted by '
                                                       'token ')
    assert unlocks[1] == '5 failure(s) cleared, lockout lifted by gallery.py unlock'


def test_a_genuine_user_failing_four_times_is_not_locked(two):
    url, client, name = two['servers']['a'].url, token(two['work'], two['db'], 'client'), 's3'
    for _ in range(2):
        for photo in two['impostors'][3][:4]:
            assert verify(url, client, name, photo).json() == {'name': name, 'match': False}
        assert verify(url, client, name, two['photos'][3]).json() == {'name': name,
                                                                       'match': True}
    assert [e for e, _ in subject_events(two['db'], name)].count('lockout') == 0


def test_a_further_template_must_match_and_counts_as_an_attempt(two):
    url, admin, name = two['servers']['a'].url, bearer(two['admin']), 's1'
    enrol = f'{url}/v1/subjects/{name}/templates'
    r = httpx.post(enrol, files={'image': ('p.jpg', two['photos'][1])}, headers=admin)
    assert r.status_code == 201 and r.json() == {'name': name, 'templates': 2}, r.text
    for photo in two['impostors'][1][:5]:
        r = httpx.post(enrol, files={'image': ('p.jpg', photo)}, headers=admin)
        assert r.status_code == 409 and 'does not match the templates' in r.json()['detail']
    assert refused(httpx.post(enrol, files={'image': ('p.jpg', two['photos'][1])},
                              headers=admin), 'too many failed')
    assert refused(verify(url, two['client'], name, two['photos'][1]), 'too many failed')
    events = subject_events(two['db'], name)
    assert sum(e == 'failure' and 'further template by token' in d for e, d in events) == 5
    assert httpx.delete(f'{enrol[:-len("/templates")]}/lockout', headers=admin).status_code == 200


def test_identify_probes_are_bounded_per_token(two):
    url, photos = two['servers']['a'].url, two['photos']
    probe, other = token(two['work'], two['db'], 'client'), token(two['work'], two['db'], 'client')

    def identify(tok, photo):
        return httpx.post(url + '/v1/identify', files={'image': ('p.jpg', photo)},
                          headers=bearer(tok), timeout=60)
    stranger = two['strangers'][0]
    assert identify(probe, stranger).json() == {'candidates': []}  # no match: 1 in a row
    assert identify(probe, photos[0]).json() == {'candidates': [{'name': 's0'}]}  # reset
    for _ in range(IDENTIFY_FAILURES):
        assert identify(probe, stranger).json() == {'candidates': []}
    assert refused(identify(probe, photos[0]), 'identify probes without a match from this token')
    assert identify(other, photos[0]).status_code == 200  # another token is not locked
    gallery = Gallery.open(two['db'])
    rows = [(e, n) for _, e, n, d in gallery.audit() if 'identify by token' in d]
    gallery.close()
    assert rows == [('failure', None)] * (1 + IDENTIFY_FAILURES) + [('lockout', None)]


def test_the_token_bucket_refuses_past_its_burst(two):
    url = two['servers']['b'].url
    first, second = token(two['work'], two['db'], 'admin'), token(two['work'], two['db'], 'admin')
    for _ in range(3):
        assert httpx.get(url + '/v1/subjects', headers=bearer(first)).status_code == 200
    r = httpx.get(url + '/v1/subjects', headers=bearer(first))
    assert r.status_code == 429 and int(r.headers['retry-after']) >= 1, r.text
    assert r.json()['detail'].startswith('too many requests from this token (--rate 0.01 per '
                                         'second, --burst 3): try again in ')
    assert httpx.get(url + '/v1/subjects', headers=bearer(second)).status_code == 200
    # Unknown tokens are refused before any bucket is made for them.
    assert httpx.get(url + '/v1/subjects', headers=bearer('iomf_x')).status_code == 401


def test_bucket_arithmetic():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take('t') for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take('t') == pytest.approx(0.5) and bucket.take('u') == 0.0
    now[0] = 0.5  # one request refilled
    assert bucket.take('t') == 0.0 and bucket.take('t') == pytest.approx(0.5)
    now[0] = 100.0  # never more than the burst
    assert [bucket.take('t') for _ in range(4)][-1] == pytest.approx(0.5)
