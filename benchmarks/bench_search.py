"""Benchmark 1:N search over IoM codes against the machine's plain numpy memory bandwidth.

Run: .venv/bin/python benchmarks/bench_search.py [--num_gallery 1000000 --m 512 --q 8 ...]

Two throughputs are reported for `modules.deploy.search.search`:
- effective scan rate: num_probes * N * m gallery bytes compared per second (what a one-probe-at-a-
  time scan would have to read), and
- memory read rate: N * m / time, the gallery bytes actually read from memory (each gallery byte is
  read once per `search` call, all probes being compared against a chunk while it is in cache).
The reference bandwidth is the best of several plain single-pass numpy reductions over the same
uint8 array (np.count_nonzero, and gallery.sum(dtype=np.uint64) which is shown for comparison).
"""
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.deploy.search import DEFAULT_CHUNK_SIZE, search, search_reference  # noqa: E402
from modules.utils import UserError, cli_guard  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_gallery', 1_000_000, 'gallery codes N')
flags.DEFINE_integer('m', 512, 'code length')
flags.DEFINE_integer('q', 8, 'indices per group (values in [0, q))')
flags.DEFINE_multi_integer('num_probes', [64, 256], 'probe batch sizes to time')
flags.DEFINE_integer('k', 10, 'top-k per probe')
flags.DEFINE_integer('chunk_size', DEFAULT_CHUNK_SIZE, 'gallery codes per chunk')
flags.DEFINE_integer('repeats', 3, 'timed runs per measurement (best is reported)')
flags.DEFINE_integer('seed', 0, 'random seed')


def best_time(fn, repeats):
    """Smallest wall time of `repeats` calls of fn()."""
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def check_exact(gallery, probes, k, chunk_size):
    """Compare with the brute-force definition on a slice (the full matrix would not fit)."""
    sub = gallery[:min(len(gallery), 20_000)]
    got = search(sub, probes[:8], k, chunk_size=chunk_size)
    ref = search_reference(sub, probes[:8], k)
    if not (np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])):
        raise AssertionError('search disagrees with the brute-force reference')


@cli_guard
def main(_):
    """Generate codes, time search and the plain passes, print a table."""
    n, m, q = FLAGS.num_gallery, FLAGS.m, FLAGS.q
    if n < 1 or m < 1 or not 1 <= q <= 256 or FLAGS.k < 1 or FLAGS.repeats < 1:
        raise UserError('need num_gallery, m, k, repeats >= 1 and 1 <= q <= 256')
    rng = np.random.default_rng(FLAGS.seed)
    gallery = rng.integers(0, q, (n, m), dtype=np.uint8)
    nbytes = gallery.nbytes
    print(f'gallery: {n:,} x {m} uint8 codes, q = {q}: {nbytes / 1e6:.0f} MB; '
          f'k = {FLAGS.k}, chunk_size = {FLAGS.chunk_size}, best of {FLAGS.repeats}; '
          f'numpy {np.__version__}')

    passes = {
        'np.count_nonzero(gallery)': lambda: np.count_nonzero(gallery),
        'gallery.max()': lambda: gallery.max(),
        'gallery.sum(dtype=np.uint64)': lambda: gallery.sum(dtype=np.uint64),
    }
    bandwidth = {}
    for name, fn in passes.items():
        t = best_time(fn, max(FLAGS.repeats, 5))
        bandwidth[name] = nbytes / t / 1e9
        print(f'  plain pass {name:30s} {t * 1e3:8.1f} ms  {bandwidth[name]:6.1f} GB/s')
    ref_bw = max(bandwidth.values())
    print(f'  reference memory bandwidth (best plain pass): {ref_bw:.1f} GB/s')

    probes_all = rng.integers(0, q, (max(FLAGS.num_probes), m), dtype=np.uint8)
    # Plant exact copies so the check below has a known answer at rank 1.
    planted = rng.choice(n, size=min(4, n), replace=False)
    probes_all[:planted.size] = gallery[planted]
    check_exact(gallery, probes_all, min(FLAGS.k, n), FLAGS.chunk_size)

    print(f'{"probes":>7} {"time s":>8} {"queries/s":>10} {"eff. GB/s":>10} {"ratio":>6} '
          f'{"mem GB/s":>9} {"ns/pair":>8}')
    for num_probes in FLAGS.num_probes:
        probes = probes_all[:num_probes]
        result = {}

        def run(probes=probes, result=result):
            result['out'] = search(gallery, probes, FLAGS.k, chunk_size=FLAGS.chunk_size)

        t = best_time(run, FLAGS.repeats)
        idx, scores = result['out']
        known = min(planted.size, num_probes)
        if not (np.array_equal(idx[:known, 0], planted[:known])
                and np.all(scores[:known, 0] == m)):
            raise AssertionError('planted exact matches were not found at rank 1')
        eff = num_probes * nbytes / t / 1e9
        print(f'{num_probes:7d} {t:8.3f} {num_probes / t:10.1f} {eff:10.1f} {eff / ref_bw:6.2f} '
              f'{nbytes / t / 1e9:9.2f} {t / (num_probes * n) * 1e9:8.2f}')
    print('eff. GB/s = probes * N * m / time; ratio = eff. GB/s / reference bandwidth; '
          'mem GB/s = N * m / time (gallery read once per call)')


if __name__ == '__main__':
    app.run(main)
