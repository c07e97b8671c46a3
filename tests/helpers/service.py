"""A serve.py subprocess on a loopback port and the HTTP clients the service tests drive it with."""
import os
import random
import signal
import subprocess
import sys
import time

import httpx
import numpy as np

from tests.helpers.workers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


ENV = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='-1')


SERVE = os.path.join(ROOT, 'serve.py')


THRESHOLD = 8  # the tiny random model's codes: same photo 0, other photos ~5-20 of 32


START_TIMEOUT_S = 180

# The load tests' server: their clients check distances (--expose_scores), share one client token
# at hundreds of requests per second (no bucket) and probe with photos of subjects that other
# clients revoke meanwhile (no bound on identify probes). Per-subject limits stay on: a client
# verifies its own photos, which always match.
LOAD_FLAGS = ('--expose_scores', '--rate', '0', '--max_identify_failures', '0')


class Server:
    """serve.py in a subprocess on a free loopback port, its output in `log_path`."""

    def __init__(self, work, db, *flags):
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}'
        self.log_path = os.path.join(work, f'server-{self.port}.log')
        with open(self.log_path, 'w') as log:
            self.proc = subprocess.Popen(
                [sys.executable, SERVE, '--db', db, '--port', str(self.port), *flags],
                cwd=work, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if httpx.get(self.url + '/healthz', timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise AssertionError('server did not start:\n' + self.log())

    def log(self):
        with open(self.log_path) as fh:
            return fh.read()

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Send `sig` and return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def token(work, db, role):
    out = subprocess.run([sys.executable, SERVE, 'token', 'add', '--role', role, '--db', db],
                         cwd=work, env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count('\n') == 1 and 'shown only now' in out.stderr
    return out.stdout.strip()


def jpeg(face):
    import cv2
    ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(face[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def bearer(tok):
    return {'Authorization': f'Bearer {tok}'}


UNAVAILABLE = 'the gallery database is unreachable: try again shortly'


class Client:
    """One load client: owns its subjects, so it knows what every answer about them must be.
    With several `urls` (service instances on one PostgreSQL gallery) each request goes to one of
    them at random: an enrolment answered by one is checked on the others' next answers. A 503
    (database restarting) must say so in one line; an enrolment answered 503 may or may not
    have been committed (`doubt`), a revoke answered 503 is sent again."""

    def __init__(self, urls, idx, photos, admin, client, requests, rng_seed):
        self.urls = [urls] if isinstance(urls, str) else urls
        self.idx, self.photos = idx, photos
        self.admin, self.client = bearer(admin), bearer(client)
        self.requests, self.rng = requests, random.Random(rng_seed)
        self.enrolled = {}  # name -> number of templates acknowledged
        self.doubt = {}  # name -> enrolments answered 503 (committed or not)
        self.statuses = []
        self.errors = []

    def check(self, ok, what):
        if not ok:
            self.errors.append(what)

    def unavailable(self, r):
        self.check(r.json() == {'detail': UNAVAILABLE}, ('503', r.text))
        return True

    def run(self, deadline):
        names = [f'c{self.idx:02d}_s{j}' for j in range(len(self.photos))]
        https = [httpx.Client(base_url=url, timeout=60) for url in self.urls]
        try:
            for _ in range(self.requests):
                if time.time() > deadline:
                    break
                j = self.rng.randrange(len(names))
                name, photo = names[j], {'image': ('p.jpg', self.photos[j])}
                op = self.rng.choices(('enrol', 'verify', 'identify', 'revoke'), (3, 4, 3, 1))[0]
                http = https[0] if len(https) == 1 else self.rng.choice(https)
                self.statuses.append(self.request(http, op, name, photo).status_code)
        finally:
            for http in https:
                http.close()

    def request(self, http, op, name, photo):
        doubt = self.doubt.get(name, 0)
        if op == 'enrol':
            r = http.post(f'/v1/subjects/{name}/templates', files=photo, headers=self.admin)
            if r.status_code == 503 and self.unavailable(r):
                self.doubt[name] = doubt + 1
                return r
            self.enrolled[name] = self.enrolled.get(name, 0) + (r.status_code == 201)
            self.check(r.status_code == 201 and self.enrolled[name] <= r.json()['templates']
                       <= self.enrolled[name] + doubt, (op, name, r.status_code, r.text))
        elif op == 'verify':
            r = http.post('/v1/verify', data={'name': name}, files=photo, headers=self.client)
            if r.status_code == 503 and self.unavailable(r) or (doubt and r.status_code == 200):
                return r
            want = 200 if name in self.enrolled else 404
            self.check(r.status_code == want and (want == 404 or (
                r.json()['distance'] == 0 and r.json()['match'])), (op, name, r.text))
        elif op == 'identify':
            r = http.post('/v1/identify', data={'top_k': '5'}, files=photo, headers=self.client)
            if r.status_code == 503 and self.unavailable(r):
                return r
            if name in self.enrolled:
                cands = r.json()['candidates'] if r.status_code == 200 else []
                exact = [c['name'] for c in cands if c['distance'] == 0]
                self.check(name in exact or len(exact) == 5, (op, name, r.text))
            elif not doubt:  # others' subjects may be found, never this one; 404 only if empty
                self.check(r.status_code in (200, 404) and (r.status_code == 404 or all(
                    c['name'] != name for c in r.json()['candidates'])), (op, name, r.text))
        else:
            for _ in range(100):  # a revoke answered 503 is sent again until it is answered
                r = http.delete(f'/v1/subjects/{name}', headers=self.admin)
                if not (r.status_code == 503 and self.unavailable(r)):
                    break
                time.sleep(0.1)
            want = 200 if name in self.enrolled else 404
            self.check(r.status_code == want or (doubt and r.status_code in (200, 404)),
                       (op, name, r.status_code, r.text))
            self.enrolled.pop(name, None)
            self.doubt.pop(name, None)
        return r
