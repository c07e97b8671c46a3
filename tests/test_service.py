"""serve.py: tokens and roles, bad input, decisions equal to the gallery's, 16-client load, SIGTERM
and SIGKILL during load. One server process on 127.0.0.1 serves the module's tests in file order
(the last one stops it with SIGTERM and restarts it); a tiny seeded model (tests/tiny_iom.py).
The module runs twice: on an SQLite gallery and on a PostgreSQL one (tests/pg_server.py)."""
import concurrent.futures
import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from modules.deploy.gallery import Gallery
from modules.deploy.store import is_postgres
from tests.helpers.gallery import gallery_bytes
from tests.helpers.service import (
    ENV,
    LOAD_FLAGS,
    SERVE,
    THRESHOLD,
    Client,
    Server,
    bearer,
    jpeg,
    token,
)


@pytest.fixture(scope='module', params=['sqlite', 'postgres'])
def svc(tmp_path_factory, request):
    from tests.helpers.tiny_iom import make_tiny_model, synthetic_faces
    work = str(tmp_path_factory.mktemp('service'))
    cfg_path = make_tiny_model(work)
    faces, gids = synthetic_faces(40, 2)
    db = (os.path.join(work, 'g.sqlite') if request.param == 'sqlite' else
          request.getfixturevalue('pg_server').create_db('service'))
    # The server creates the gallery; tokens are added while it runs (seen on the next request).
    server = Server(work, db, '--cfg_path', cfg_path, '--threshold', str(THRESHOLD),
                    '--max_pixels', '1000000', '--max_upload_mb', '1', *LOAD_FLAGS)
    state = {'work': work, 'cfg_path': cfg_path, 'db': db, 'server': server, 'faces': faces,
             'gids': gids, 'admin': token(work, db, 'admin'), 'client': token(work, db, 'client')}
    yield state
    state['server'].stop(signal.SIGKILL)


def no_traceback(response):
    assert 'Traceback' not in response.text and response.status_code < 500, response.text
    return response


def test_tokens_roles_and_revocation(svc):
    url, db, work = svc['server'].url, svc['db'], svc['work']
    photo = {'image': ('p.jpg', jpeg(svc['faces'][0]), 'image/jpeg')}
    r = no_traceback(httpx.post(url + '/v1/identify', files=photo))
    assert r.status_code == 401 and 'Authorization: Bearer' in r.json()['detail']
    assert r.headers['www-authenticate'] == 'Bearer'
    r = httpx.post(url + '/v1/identify', files=photo, headers=bearer(svc['client'] + 'x'))
    assert r.status_code == 401 and r.json() == {'detail': 'invalid or revoked token'}
    r = httpx.get(url + '/v1/subjects', headers=bearer(svc['client']))
    assert r.status_code == 403 and r.json() == {'detail': 'this needs an admin token'}
    assert httpx.get(url + '/v1/subjects', headers=bearer(svc['admin'])).json() == {'subjects': []}
    # The page and the API docs need no token and load nothing from elsewhere.
    page = httpx.get(url + '/')
    assert page.status_code == 200 and "default-src 'self'" in page.headers['content-security-policy']
    docs = httpx.get(url + '/docs').text
    assert 'swagger-ui-bundle.js' in docs and 'http' not in docs.replace('http-equiv', '')
    # A token made and revoked on the command line while the server runs.
    extra = token(work, db, 'client')
    assert httpx.post(url + '/v1/identify', files=photo,
                      headers=bearer(extra)).status_code == 404  # authorised; nobody enrolled
    listed = subprocess.run([sys.executable, SERVE, 'token', 'list', '--db', db], cwd=work, env=ENV,
                            capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert [line.split()[1] for line in listed] == ['admin', 'client', 'client']
    out = subprocess.run([sys.executable, SERVE, 'token', 'revoke', '--id', listed[2].split()[0],
                          '--db', db], cwd=work, env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert httpx.post(url + '/v1/identify', files=photo,
                      headers=bearer(extra)).status_code == 401
    out = subprocess.run([sys.executable, SERVE, 'token', 'revoke', '--id', 'abc', '--db', db],
                         cwd=work, env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: no token with id 'abc'")
    # Only digests are stored.
    data = gallery_bytes(db)
    for tok in (svc['admin'], svc['client'], extra):
        assert tok.encode() not in data


def test_bad_input_gets_a_clear_4xx(svc):
    import cv2
    url, client = svc['server'].url, bearer(svc['client'])
    admin = bearer(svc['admin'])
    face = jpeg(svc['faces'][0])
    r = httpx.post(url + '/v1/subjects/alice/templates', files={'image': ('a.jpg', face)},
                   headers=admin)
    assert r.status_code == 201 and r.json() == {'name': 'alice', 'templates': 1}
    cases = {}
    big = b'\xff' * (1024 * 1024 + 10)  # over --max_upload_mb 1
    cases['declared too large'] = (413, httpx.post(
        url + '/v1/verify', data={'name': 'alice'}, files={'image': ('big.jpg', big)},
        headers=client))

    def chunks():  # no Content-Length: the limit applies while the body streams in
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="b.jpg"\r\n\r\n'
        for _ in range(40):
            yield b'\0' * 65536
    cases['streamed too large'] = (413, httpx.post(
        url + '/v1/verify', content=chunks(), headers={
            **client, 'Content-Type': 'multipart/form-data; boundary=x'}))
    ok, bomb = cv2.imencode('.png', np.zeros((1001, 1000, 3), np.uint8))  # 1.001 MP, 3 kB
    cases['too many pixels'] = (413, httpx.post(
        url + '/v1/verify', data={'name': 'alice'}, files={'image': ('bomb.png', bomb.tobytes())},
        headers=client))
    cases['not an image'] = (422, httpx.post(
        url + '/v1/verify', data={'name': 'alice'}, files={'image': ('notes.jpg', b'hello')},
        headers=client))
    ok, blank = cv2.imencode('.png', np.full((150, 200, 3), 128, np.uint8))
    cases['no face'] = (422, httpx.post(
        url + '/v1/identify', files={'image': ('wall.png', blank.tobytes())}, headers=client))
    cases['unknown subject'] = (404, httpx.post(
        url + '/v1/verify', data={'name': 'carol'}, files={'image': ('a.jpg', face)},
        headers=client))
    cases['unknown subject revoked'] = (404, httpx.delete(url + '/v1/subjects/carol',
                                                          headers=admin))
    cases['no image'] = (422, httpx.post(url + '/v1/verify', data={'name': 'alice'},
                                         headers=client))
    cases['malformed form'] = (422, httpx.post(
        url + '/v1/verify', content=b'garbage', headers={
            **client, 'Content-Type': 'multipart/form-data; boundary=zz'}))
    cases['bad top_k'] = (422, httpx.post(url + '/v1/identify', data={'top_k': 'many'},
                                          files={'image': ('a.jpg', face)}, headers=client))
    cases['bad name'] = (422, httpx.post(url + '/v1/subjects/' + 'n' * 201 + '/templates',
                                         files={'image': ('a.jpg', face)}, headers=admin))
    for what, (status, r) in cases.items():
        no_traceback(r)
        assert r.status_code == status, (what, r.text)
        detail = r.json()['detail']
        assert isinstance(detail, str) and '\n' not in detail, (what, detail)
    # The messages of gallery.py / modules.align for the same faults, with the upload's name.
    assert cases['not an image'][1].json()['detail'] == 'notes.jpg: not an image (unknown format)'
    assert cases['no face'][1].json()['detail'].startswith('wall.png: no face found')
    assert 'over --max_pixels 1000000' in cases['too many pixels'][1].json()['detail']
    assert cases['unknown subject'][1].json()['detail'].startswith("'carol' is not enrolled")
    assert cases['bad top_k'][1].json()['detail'].startswith('top_k:')
    assert httpx.get(url + '/healthz').json()['templates'] == 1


def test_decisions_are_the_gallerys(svc, monkeypatch):
    """The API's distances equal Gallery.verify/identify on the model's codes in this process."""
    from modules.config import STAGE2_REQUIRED, load_config
    from modules.deploy.hashing import Hasher
    url, faces, gids = svc['server'].url, svc['faces'], svc['gids']
    admin, client = bearer(svc['admin']), bearer(svc['client'])
    assert httpx.post(url + '/v1/subjects/bob/templates', files={'image': ('b.jpg', jpeg(
        faces[2]))}, headers=admin).status_code == 201
    probes = [faces[1], faces[3], faces[4]]
    answers = [httpx.post(url + '/v1/verify', data={'name': 'alice', 'return_crop': 'true'},
                          files={'image': ('p.jpg', jpeg(p))}, headers=client).json()
               for p in probes]
    found = httpx.post(url + '/v1/identify', data={'top_k': '2'},
                       files={'image': ('p.jpg', jpeg(faces[3]))}, headers=client).json()
    monkeypatch.chdir(svc['work'])
    gallery = Gallery.open(svc['db'])
    hasher = Hasher(load_config(svc['cfg_path'], STAGE2_REQUIRED), gallery.key)
    # The server hashed the decoded JPEGs: decode them the same way here.
    from modules.align import read_photo
    codes = hasher.codes(np.stack([read_photo(io.BytesIO(jpeg(p))) for p in probes]))
    for answer, code in zip(answers, codes):
        distance = gallery.verify('alice', code)
        assert answer['distance'] == distance
        assert answer['match'] == (distance <= THRESHOLD) and answer['threshold'] == THRESHOLD
        assert answer['crop'].startswith('data:image/png;base64,')
    expected = gallery.identify(codes[1], 2)
    assert [(c['name'], c['distance']) for c in found['candidates']] == [e[:2] for e in expected]
    assert found['templates'] == 2
    print('verify distances alice vs probes of ids', gids[[1, 3, 4]], [a['distance'] for a in answers])


def test_rekey_revokes_every_template(svc):
    url, admin, client = svc['server'].url, bearer(svc['admin']), bearer(svc['client'])
    before = httpx.get(url + '/healthz').json()
    assert httpx.post(url + '/v1/rekey', headers=client).status_code == 403
    r = httpx.post(url + '/v1/rekey', headers=admin, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body['old_key_id'] == before['key_id'] != body['key_id'] and body['deleted'] == 2
    after = httpx.get(url + '/healthz').json()
    assert after['templates'] == 0 and after['key_id'] == body['key_id']
    photo = {'image': ('a.jpg', jpeg(svc['faces'][0]))}
    assert httpx.post(url + '/v1/subjects/alice/templates', files=photo,
                      headers=admin).status_code == 201
    assert httpx.post(url + '/v1/verify', data={'name': 'alice'}, files=photo,
                      headers=client).json()['distance'] == 0
    assert httpx.delete(url + '/v1/subjects/alice', headers=admin).json()['deleted'] == 1






def test_sixteen_clients_1000_mixed_requests(svc):
    faces = svc['faces']
    clients = [Client(svc['server'].url, i, [jpeg(faces[(2 * i + j) % len(faces)]) for j in range(2)],
                      svc['admin'], svc['client'], 63 if i < 8 else 62, i) for i in range(16)]
    deadline = time.time() + 240
    before = httpx.get(svc['server'].url + '/healthz').json()
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda c: c.run(deadline), clients))
    elapsed = time.time() - start
    after = httpx.get(svc['server'].url + '/healthz').json()
    statuses = [s for c in clients for s in c.statuses]
    hashed = after['photos_hashed'] - before['photos_hashed']
    batch = hashed / (after['model_calls'] - before['model_calls'])
    print(f'{len(statuses)} requests from 16 clients in {elapsed:.1f} s '
          f'({len(statuses) / elapsed:.0f}/s); statuses {sorted(set(statuses))}; {hashed} photos '
          f'hashed, {batch:.1f} per model call')
    assert len(statuses) == 1000 and max(statuses) < 500
    assert batch > 1.5  # concurrent photos share model calls
    assert [e for c in clients for e in c.errors] == []
    expected = {name: n for c in clients for name, n in c.enrolled.items()}
    final = {name: count for name, count, _, _ in Gallery.open(svc['db']).subjects()}
    assert final == expected


def enrol_until_stopped(url, admin, photo, prefix, acked, statuses, stop, limit=60):
    """Enrol prefix_0, prefix_1, ... until a connection fails or `stop` is set; record 201s."""
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(limit):
            if stop.is_set():
                return
            try:
                r = http.post(f'/v1/subjects/{prefix}_{i}/templates',
                              files={'image': ('p.jpg', photo)}, headers=bearer(admin))
            except httpx.TransportError:
                return  # the server is gone: a clean failure, nothing acknowledged
            statuses.append(r.status_code)
            if r.status_code == 201:
                acked.append(f'{prefix}_{i}')


def enrol_load(server, svc, prefix, sig, after_acks=40):
    """16 clients enrolling; `sig` once `after_acks` enrolments are acknowledged. Returns
    (acknowledged names, statuses, exit status)."""
    acked, statuses, stop = [], [], threading.Event()
    photos = [jpeg(f) for f in svc['faces'][:16]]
    threads = [threading.Thread(target=enrol_until_stopped, args=(
        server.url, svc['admin'], photos[i], f'{prefix}{i:02d}', acked, statuses, stop))
        for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while len(acked) < after_acks and time.time() < deadline:
        time.sleep(0.01)
    code = server.stop(sig)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return list(acked), statuses, code


def test_sigterm_then_sigkill_during_enrolment_loses_nothing_acknowledged(svc):
    before = {name for name, *_ in Gallery.open(svc['db']).subjects()}
    acked, statuses, code = enrol_load(svc['server'], svc, 'term', signal.SIGTERM)
    log = svc['server'].log()
    assert code == 0, log
    assert statuses and set(statuses) == {201}, sorted(set(statuses))
    for tok in (svc['admin'], svc['client']):
        assert tok not in log and tok[5:] not in log
    assert 'Traceback' not in log
    # Restart on the same database: what was acknowledged is there, and the tokens still work.
    server = svc['server'] = Server(svc['work'], svc['db'], '--threshold', str(THRESHOLD),
                                    *LOAD_FLAGS)
    names = {s['name'] for s in httpx.get(server.url + '/v1/subjects', headers=bearer(
        svc['admin'])).json()['subjects']}
    assert set(acked) <= names and names - set(acked) <= before
    print(f'SIGTERM: {len(acked)} enrolments acknowledged, all present after restart')
    acked, statuses, code = enrol_load(server, svc, 'kill', signal.SIGKILL)
    assert code == -signal.SIGKILL and set(statuses) == {201}
    if not is_postgres(svc['db']):
        conn = sqlite3.connect(svc['db'])
        assert conn.execute('PRAGMA integrity_check').fetchone() == ('ok',)
        conn.close()
    gallery = Gallery.open(svc['db'])
    names = {name for name, *_ in gallery.subjects()}
    assert set(acked) <= names
    # A kill may land between the commit and the answer: at most one unacknowledged enrolment
    # per client, each whole (one template).
    extra = {n for n in names - set(acked) if n.startswith('kill')}
    assert len(extra) <= 16 and all(len(gallery.templates_of(n)) == 1 for n in extra)
    print(f'SIGKILL: {len(acked)} enrolments acknowledged, all present, integrity ok, '
          f'{len(extra)} committed but not acknowledged')


def test_subject_keys_travel_with_the_request_and_are_never_kept(svc):
    work, faces = svc['work'], svc['faces']
    db = os.path.join(work, 'subject.sqlite')
    server = Server(work, db, '--cfg_path', svc['cfg_path'], '--threshold', str(THRESHOLD),
                    '--key_mode', 'subject', '--expose_scores')
    try:
        admin, client = bearer(token(work, db, 'admin')), bearer(token(work, db, 'client'))
        photo = {'image': ('a.jpg', jpeg(faces[0]))}
        r = httpx.post(server.url + '/v1/subjects/alice/templates', files=photo, headers=admin)
        assert r.status_code == 201, r.text
        key = r.json()['subject_key']
        other = f'{int(key, 16) ^ 1:x}'
        answer = httpx.post(server.url + '/v1/verify', data={'name': 'alice', 'subject_key': key},
                            files=photo, headers=client).json()
        assert answer['distance'] == 0 and answer['match'] and answer['key_matches']
        # Someone else's key never matches, even at a threshold that would accept any code.
        answer = httpx.post(server.url + '/v1/verify', data={'name': 'alice', 'subject_key': other},
                            files=photo, headers=client).json()
        assert not answer['match'] and not answer['key_matches']
        missing = no_traceback(httpx.post(server.url + '/v1/verify', data={'name': 'alice'},
                                          files=photo, headers=client))
        assert missing.status_code == 422 and 'subject_key' in missing.json()['detail']
        again = httpx.post(server.url + '/v1/subjects/alice/templates', files=photo,
                           data={'subject_key': other}, headers=admin)
        assert again.status_code == 409 and 'another key' in again.json()['detail']
        for path, who in (('/v1/identify', client), ('/v1/rekey', admin)):
            refused = no_traceback(httpx.post(server.url + path, files=photo, headers=who))
            assert refused.status_code == 409 and 'subject-key gallery' in refused.json()['detail']
    finally:
        assert server.stop() == 0
    stored = b''.join(open(p, 'rb').read() for p in (db, db + '-wal') if os.path.exists(p))
    for secret in (key, other):
        assert secret.encode() not in stored and secret not in server.log()
