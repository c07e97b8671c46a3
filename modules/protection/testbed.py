"""The live service the online attacks run against (eval_protection.py --online).

`evaluate_online` starts serve.py on 127.0.0.1 over a fresh gallery in a temporary folder, enrols
test-set subjects through the admin API, picks for each a start image of another person that the
service does not accept as them, and runs every attack of `modules.protection.online` under two
settings of the same gallery: scores exposed without limits (`--expose_scores`, no attempt
limits, no bucket: the service before issue 30) and serve.py's defaults. The attacker gets a new
client token for every attack; between attacks the evaluation (not the attacker) clears the
lockouts with its admin token, so each attack starts from a clean count. Like any operator it
uses the service's own interfaces only: `serve.py token add` and HTTP.
"""
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from modules.protection.online import ATTACKS, Oracle, attack, png, summarise
from modules.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = {
    'scores exposed, no limits': ('--expose_scores', '--max_failures', '0',
                                  '--max_identify_failures', '0', '--rate', '0'),
    'defaults': (),
}
_START_TIMEOUT_S = 600
_STOP_TIMEOUT_S = 120


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class LiveService:
    """serve.py in a subprocess on a free loopback port, its log in `log_path`."""

    def __init__(self, db, cfg_path, log_path, flags):
        # In the caller's folder: the config's relative paths (checkpoints/, logs/) are from there.
        import httpx
        port = _free_port()
        self.url = f'http://127.0.0.1:{port}'
        self.log_path = log_path
        with open(log_path, 'w') as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, 'serve.py'), '--db', db, '--cfg_path',
                 cfg_path, '--host', '127.0.0.1', '--port', str(port), '--log_level', 'warning',
                 *flags], env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), stdout=log,
                stderr=subprocess.STDOUT)
        deadline = time.time() + _START_TIMEOUT_S
        while time.time() < deadline and self.proc.poll() is None:
            try:
                self.health = httpx.get(self.url + '/healthz', timeout=5).json()
                return
            except httpx.TransportError:
                time.sleep(0.5)
        self.stop()
        with open(log_path, errors='replace') as log:
            said = [line[len('error: '):].strip() for line in log if line.startswith('error: ')]
        raise UserError(f"serve.py did not start: {said[-1] if said else 'no answer'} (its log: "
                        f'{log_path})')

    def stop(self):
        """SIGTERM, and SIGKILL if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _token(db, role):
    """A new token from `serve.py token add` (printed once on stdout)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'serve.py'), 'token', 'add',
                          '--role', role, '--db', db], cwd=ROOT, capture_output=True, text=True,
                         timeout=_STOP_TIMEOUT_S)
    if out.returncode:
        raise UserError(f'serve.py token add: {out.stderr.strip()}')
    return out.stdout.strip()


def _call(http, method, path, **kwargs):
    r = http.request(method, path, **kwargs)
    if r.status_code >= 300:
        raise UserError(f'{method} {path}: {r.status_code} {r.text[:200]}')
    return r.json()


def _pick_starts(url, token, victims, candidates):
    """For victim i, the first candidate image from the i-th on that the service (scores
    exposed) does not accept as them: (images, their distances). Candidates are photos of other
    test-set pairs: each victim starts from another person."""
    import httpx
    starts, distances = [], []
    with httpx.Client(base_url=url, timeout=300, headers={'Authorization': f'Bearer {token}'}) \
            as http:
        for i, victim in enumerate(victims):
            for image in np.roll(candidates, -i, axis=0):
                body = _call(http, 'POST', '/v1/verify', data={'name': victim},
                                   files={'image': ('start.png', png(image))})
                if not body['match']:
                    starts.append(image)
                    distances.append(body['distance'])
                    break
            else:
                raise UserError(f'no test-set image is a non-match for {victim}: use another set')
    return starts, distances


def _subjects(images, issame, n):
    """Enrolment images of n subjects (first image of n genuine pairs) and candidate start
    images (first images of the other genuine pairs): uint8 RGB."""
    genuine = np.flatnonzero(issame)
    if len(genuine) < n + 1:
        raise UserError(f'--online_subjects {n}: the set has {len(genuine)} genuine pairs, '
                        'need one more than the subjects')
    pixels = np.clip(np.rint(np.asarray(images) * 255), 0, 255).astype(np.uint8)
    return pixels[2 * genuine[:n]], pixels[2 * genuine[n:]]


def _run_setting(service, tokens, victims, starts, budget, seed):
    """Every attack on every victim under one running service; rows of per-victim results."""
    import httpx
    results = {}
    with httpx.Client(base_url=service.url, timeout=300,
                      headers={'Authorization': f"Bearer {tokens('admin')}"}) as admin:
        for a, kind in enumerate(ATTACKS):
            for victim in victims:  # a clean count for every attack (the evaluation's doing)
                _call(admin, 'DELETE', f'/v1/subjects/{victim}/lockout')
            oracle = Oracle(service.url, tokens('client'))
            try:
                rng = np.random.default_rng([seed, a])
                results[kind] = [attack(oracle, kind, victim, start, budget, rng, len(victims))
                                 for victim, start in zip(victims, starts)]
            finally:
                oracle.close()
    return results


def evaluate_online(cfg_path, images, issame, n_subjects, budget, seed=0, threshold=None):
    """Run the online attacks under both settings; the report (rows for the table, the figures
    per victim, the service's threshold and limits). The threshold is serve.py's default (the
    model's last evaluation) unless given."""
    enrol, candidates = _subjects(images, issame, n_subjects)
    logging.getLogger('httpx').setLevel(logging.WARNING)  # not one log line per request
    work = tempfile.mkdtemp(prefix='iomface_online_')
    db = os.path.join(work, 'gallery.sqlite')

    def tokens(role):
        return _token(db, role)
    report = {'subjects': n_subjects, 'budget': budget, 'rows': [], 'per_subject': {},
              'settings': {name: ' '.join(flags) or '(none)' for name, flags in SETTINGS.items()}}
    victims = [f'subject{i:03d}' for i in range(n_subjects)]
    for s, (setting, flags) in enumerate(SETTINGS.items()):
        given = () if threshold is None else ('--threshold', str(threshold))
        service = LiveService(db, cfg_path, os.path.join(work, f'serve{s}.log'), flags + given)
        try:
            if s == 0:  # the gallery is made by the first service; the starts picked there
                _enrol(service.url, tokens('admin'), victims, enrol)
                starts, distances = _pick_starts(service.url, tokens('client'), victims,
                                                 candidates)
                report.update(m=service.health['m'], threshold=service.health['threshold'],
                              start_distances=distances, start_distance_min=min(distances),
                              start_distance_max=max(distances))
            report['limits_' + setting] = service.health['limits']
            results = _run_setting(service, tokens, victims, starts, budget, seed)
        finally:
            service.stop()
        for kind, runs in results.items():
            report['rows'].append({'attack': kind, 'setting': setting, **summarise(runs)})
            report['per_subject'][f'{kind} / {setting}'] = runs
    shutil.rmtree(work)  # kept after a failure: the servers' logs say what went wrong
    return report


def _enrol(url, admin, victims, faces):
    import httpx
    with httpx.Client(base_url=url, timeout=300, headers={'Authorization': f'Bearer {admin}'}) \
            as http:
        for victim, face in zip(victims, faces):
            _call(http, 'POST', f'/v1/subjects/{victim}/templates',
                        files={'image': ('enrol.png', png(face))})
