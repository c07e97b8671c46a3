"""Benchmark serve.py: requests/s and latency at 1, 4 and 16 concurrent clients, against hashing
the same photos offline in batches in one process.

Run (after `make quickstart`, from the repository root):
    .venv/bin/python benchmarks/bench_serve.py [--cfg_path configs/quickstart_stage2.yaml]

A gallery of `--num_codes` random codes (one subject each) is made under the model's key, the
server is started on 127.0.0.1 with it, and clients (asyncio, one HTTP connection each) send
`verify` (against a random subject) and `identify` (top 5) requests with aligned 112x112 crops
from the quickstart's synthetic retrieval set (so the face detector is not part of the figure).
Each round measures, interleaved: the offline rate (decoded crops through `Hasher.codes`, traced
as in the server, in batches of eval_batch_size: the model alone, no HTTP, no JPEG decoding),
then every (clients, endpoint) pair after a warm-up of 2 requests per client, with the CPU time
the server and the clients spent. The table shows the median over rounds; the ratio is median
16-client requests/s over median offline photos/s.
"""
import asyncio
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modules.config import STAGE2_REQUIRED, load_config  # noqa: E402
from modules.utils import UserError, cli_guard  # noqa: E402
from tests.helpers.workers import free_port  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('cfg_path', 'configs/quickstart_stage2.yaml', 'stage-2 config (trained)')
flags.DEFINE_string('faces', 'data/synthetic/retrieval',
                    'folder tree of aligned input_size crops (jpg)')
flags.DEFINE_integer('num_faces', 64, 'distinct photos sent')
flags.DEFINE_integer('num_codes', 10_000, 'templates in the gallery')
flags.DEFINE_integer('rounds', 3, 'interleaved rounds (median reported)')
flags.DEFINE_integer('requests_per_client', 30, 'measured requests per client and endpoint')
flags.DEFINE_integer('offline_images', 512, 'images hashed per offline measurement')
flags.DEFINE_float('batch_wait_ms', None, "the server's --batch_wait_ms (default: serve.py's)")
CLIENTS = (1, 4, 16)
ENDPOINTS = ('verify', 'identify')


def start_server(db, cfg_path, log_path, *extra):
    """serve.py (with `extra` flags) on a free loopback port; (process, base url) once /healthz
    answers."""
    import httpx
    port = free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'serve.py'), '--db', db,
                                 '--cfg_path', cfg_path, '--port', str(port), '--log_level',
                                 'warning', *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + '/healthz', timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise UserError(f'the server did not start; its log: {log_path}')


def multipart(fields, photo, boundary='bench-serve-boundary'):
    """(body, content type) of a multipart form with `fields` and the photo as `image`."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"'
                 '\r\nContent-Type: image/jpeg\r\n\r\n'.encode() + photo + b'\r\n')
    return b''.join(parts) + f'--{boundary}--\r\n'.encode(), f'multipart/form-data; boundary={boundary}'


async def drive(url, token, endpoint, bodies, clients, per_client):
    """(wall seconds, latencies in s, mean photos per model call) of clients x per_client
    requests after a warm-up."""
    import httpx
    latencies = []

    async def client(http, c, count, record):
        for k in range(count):
            body, content_type = bodies[(c * 7919 + k) % len(bodies)]
            start = time.perf_counter()
            r = await http.post(f'/v1/{endpoint}', content=body, headers={
                'Authorization': f'Bearer {token}', 'Content-Type': content_type})
            elapsed = time.perf_counter() - start
            if r.status_code != 200:
                raise UserError(f'{endpoint}: HTTP {r.status_code} {r.text[:200]}')
            if record:
                latencies.append(elapsed)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http, c, 2, False) for c in range(clients)))
        before = (await http.get('/healthz')).json()
        start = time.perf_counter()
        await asyncio.gather(*(client(http, c, per_client, True) for c in range(clients)))
        wall = time.perf_counter() - start
        after = (await http.get('/healthz')).json()
    batch = ((after['photos_hashed'] - before['photos_hashed'])
             / max(1, after['model_calls'] - before['model_calls']))
    return wall, np.asarray(latencies), batch


def cpu_seconds(pid=None):
    """CPU time (user + system) of this process, or of process `pid` (Linux /proc)."""
    if pid is None:
        return time.process_time()
    with open(f'/proc/{pid}/stat') as fh:
        fields = fh.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def offline_rate(hasher, faces):
    """(photos/s, CPU s per photo) of hashing decoded crops in eval_batch_size batches (after
    one warm-up batch)."""
    batch = np.resize(faces, (FLAGS.offline_images, *faces.shape[1:]))
    hasher.codes(batch[:hasher.cfg['eval_batch_size']])
    start, cpu = time.perf_counter(), cpu_seconds()
    hasher.codes(batch)
    return len(batch) / (time.perf_counter() - start), (cpu_seconds() - cpu) / len(batch)


@cli_guard
def main(_):
    """Build the gallery, start the server, measure, print the table."""
    import cv2

    from modules.deploy.gallery import Gallery
    from modules.deploy.hashing import Hasher
    from modules.deploy.tokens import add_token
    from modules.utils import quiet_tensorflow
    cfg = load_config(FLAGS.cfg_path, STAGE2_REQUIRED)
    paths = sorted(glob.glob(os.path.join(FLAGS.faces, '**', '*.jpg'), recursive=True))
    if len(paths) < FLAGS.num_faces:
        raise UserError(f'{FLAGS.faces}: {len(paths)} jpg crops, need {FLAGS.num_faces} (run '
                        '`make quickstart` first)')
    paths = paths[::len(paths) // FLAGS.num_faces][:FLAGS.num_faces]
    photos = [open(p, 'rb').read() for p in paths]
    faces = np.stack([cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
                      for b in photos])
    if faces.shape[1:3] != (cfg['input_size'],) * 2:
        raise UserError(f'{FLAGS.faces}: crops are {faces.shape[1:3]}, the model takes '
                        f"{cfg['input_size']}")
    quiet_tensorflow()
    work = tempfile.mkdtemp(prefix='bench_serve_')
    db = os.path.join(work, 'g.sqlite')
    fingerprint = Hasher(cfg, None).fingerprint
    gallery = Gallery.create(db, FLAGS.cfg_path, cfg['m'], cfg['q'], fingerprint)
    names = [f'subject{i:05d}' for i in range(FLAGS.num_codes)]
    gallery.enroll_bulk(names, np.random.default_rng(0).integers(
        0, cfg['q'], (FLAGS.num_codes, cfg['m']), dtype=np.uint8))
    token, _ = add_token(gallery, 'client')
    hasher = Hasher(cfg, gallery.key).trace()  # as the server runs it
    gallery.close()
    # The clients verify photos against random subjects (every answer a non-match) from one
    # token at hundreds of requests per second: the attempt limits and the bucket would refuse
    # nearly all of it. What is measured is the path of a photo, without them.
    extra = ('--max_failures', '0', '--max_identify_failures', '0', '--rate', '0')
    if FLAGS.batch_wait_ms is not None:
        extra += ('--batch_wait_ms', str(FLAGS.batch_wait_ms))
    proc, url = start_server(db, FLAGS.cfg_path, os.path.join(work, 'server.log'), *extra)
    print(f'server {url}: {FLAGS.num_codes:,} templates, m={cfg["m"]} q={cfg["q"]}, '
          f'{FLAGS.num_faces} aligned {cfg["input_size"]}px crops, {FLAGS.rounds} rounds, '
          f'{os.cpu_count()} CPUs')
    # Request bodies are encoded once: the clients share the server's two cores, so they should
    # spend as little as possible.
    rng = np.random.default_rng(1)
    bodies = {'verify': [multipart({'name': names[rng.integers(len(names))]}, photos[i % len(photos)])
                         for i in range(4 * len(photos))],
              'identify': [multipart({'top_k': 5}, photo) for photo in photos]}
    results = {(c, e): [] for c in CLIENTS for e in ENDPOINTS}
    offline = []
    try:
        for _ in range(FLAGS.rounds):
            offline.append(offline_rate(hasher, faces))
            for clients in CLIENTS:
                for endpoint in ENDPOINTS:
                    cpu = cpu_seconds(), cpu_seconds(proc.pid)
                    wall, latencies, batch = asyncio.run(drive(
                        url, token, endpoint, bodies[endpoint], clients,
                        FLAGS.requests_per_client))
                    # Per request, warm-up included (its share is 2 of 2 + requests_per_client).
                    n = clients * (2 + FLAGS.requests_per_client)
                    results[clients, endpoint].append((wall, latencies, batch, (
                        cpu_seconds(proc.pid) - cpu[1]) / n, (cpu_seconds() - cpu[0]) / n))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    base = float(np.median([rate for rate, _ in offline]))
    print(f'\noffline batched hashing: {base:.1f} photos/s (median of {len(offline)}: '
          + ', '.join(f'{r:.1f}' for r, _ in offline) + '), '
          f'{np.median([c for _, c in offline]) * 1e3:.1f} CPU ms per photo\n')
    print('| clients | endpoint | requests/s | p50 ms | p99 ms | photos per model call | '
          'server CPU ms / request | client CPU ms / request | requests/s / offline |')
    print('| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    for (clients, endpoint), runs in results.items():
        rate = float(np.median([len(r[1]) / r[0] for r in runs]))
        p50 = np.median([np.percentile(r[1], 50) for r in runs]) * 1e3
        p99 = np.median([np.percentile(r[1], 99) for r in runs]) * 1e3
        batch, server_cpu, client_cpu = np.median([r[2:] for r in runs], axis=0)
        print(f'| {clients} | {endpoint} | {rate:.1f} | {p50:.1f} | {p99:.1f} | {batch:.1f} | '
              f'{server_cpu * 1e3:.1f} | {client_cpu * 1e3:.1f} | {rate / base:.2f} |')
    for endpoint in ENDPOINTS:
        rate = float(np.median([len(r[1]) / r[0] for r in results[16, endpoint]]))
        print(f'ratio 16-client {endpoint} requests/s / offline: {rate / base:.2f} (target >= 0.7)')


if __name__ == '__main__':
    app.run(main)
