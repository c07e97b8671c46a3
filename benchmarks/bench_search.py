"""Benchmark 1:N search: the code index against faiss and against reading its planes once.

Run: .venv/bin/python benchmarks/bench_search.py [--num_gallery 1000000 --num_gallery 10000000]
     [--m 512 --q 8 --num_probes 1 --num_probes 64 ...]

Per gallery size N, random codes go into a `modules.deploy.index.CodeIndex` (bit planes) and, as
one-hot codes (q bits per index, so Hamming distance = 2 x IoM distance, exact), into faiss'
`IndexBinaryFlat` (exhaustive, exact). With --today_max_n >= N the uint8 matrix is kept too, for
`modules.deploy.search.search` (what the gallery used before the index). Then, interleaved in
every round (median of --repeats):
- `np.sum` over the index's planes, one thread: the bandwidth reference (one plain pass over the
  same bytes), and the same sum split over the index's threads (the machine's both-core rate);
- one probe: the index, faiss with one thread and with all (OpenMP threads that wait for each
  other lose badly on a busy machine, so the faster of the two is the comparison; its best
  distance must be twice ours), and `search`;
- each batch of --num_probes > 1: the index and `search` (identical results required); faiss too
  with --faiss_batches.
Ratios are printed as ratio of the medians [median of the per-round ratios].
"""
import logging
import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.deploy.index import CodeIndex, default_threads, thread_pool  # noqa: E402
from modules.deploy.search import search  # noqa: E402
from modules.utils import UserError, cli_guard  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_integer('num_gallery', [1_000_000], 'gallery sizes N (one run each)')
flags.DEFINE_integer('m', 512, 'code length')
flags.DEFINE_integer('q', 8, 'indices per group (values in [0, q))')
flags.DEFINE_multi_integer('num_probes', [1, 64, 256], 'probes per call (1: single probe)')
flags.DEFINE_integer('k', 10, 'top-k per probe')
flags.DEFINE_integer('repeats', 7, 'interleaved rounds (medians are reported)')
flags.DEFINE_integer('batch_repeats', 3, 'rounds for the probe batches')
flags.DEFINE_integer('today_max_n', 1_000_000, 'also time modules.deploy.search.search (keeps '
                     'the uint8 matrix) up to this N')
flags.DEFINE_bool('faiss_batches', False, 'time faiss on the probe batches too')
flags.DEFINE_integer('threads', None, 'index threads (default: the cores available)')
flags.DEFINE_integer('seed', 0, 'random seed')
_GEN = 100_000  # codes generated at a time


def rss_bytes():
    """Resident memory of this process."""
    with open('/proc/self/statm') as fh:
        return int(fh.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def one_hot(codes, q):
    """(n, m) indices as packed one-hot bits, q bits per index (one byte per index at q = 8)."""
    if q == 8:
        return np.left_shift(np.uint8(1), codes)
    bits = codes[:, :, None] == np.arange(q, dtype=np.uint8)
    return np.packbits(bits.reshape(len(codes), -1), axis=1)


def build(n, rng):
    """The index, the faiss index and (up to --today_max_n) the uint8 matrix of n random codes."""
    import faiss
    m, q = FLAGS.m, FLAGS.q
    before = rss_bytes()
    index = CodeIndex(m, q, threads=FLAGS.threads)
    flat = faiss.IndexBinaryFlat(8 * one_hot(np.zeros((1, m), np.uint8), q).shape[1])
    today = np.empty((n, m), np.uint8) if n <= FLAGS.today_max_n else None
    start = time.perf_counter()
    index_s = 0.0
    for begin in range(0, n, _GEN):
        codes = rng.integers(0, q, (min(_GEN, n - begin), m), dtype=np.uint8)
        t = time.perf_counter()
        index.append(np.arange(begin, begin + len(codes)), codes)
        index_s += time.perf_counter() - t
        flat.add(one_hot(codes, q))
        if today is not None:
            today[begin:begin + len(codes)] = codes
    planes = n * index.bytes_per_code
    print(f'N = {n:,}, m = {m}, q = {q}: built in {time.perf_counter() - start:.1f} s (index '
          f'{index_s:.2f} s = {n / index_s:,.0f} codes/s); planes {planes / 1e6:,.0f} MB '
          f'({index.bytes_per_code} B/code), index allocated {index.allocated_bytes() / planes:.3f}'
          f'x planes; faiss one-hot {n * flat.code_size / 1e6:,.0f} MB; process RSS '
          f'{(rss_bytes() - before) / 1e6:,.0f} MB more')
    return index, flat, today


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def used_planes(index):
    """Views of the planes in use, block by block."""
    return [b[:, :, :min(index.block_size, index._size - i * index.block_size)]
            for i, b in enumerate(index._blocks)]


def bandwidth_fns(index):
    """The plain np.sum over the planes (one thread), and the same split over the threads."""
    views = used_planes(index)
    pool = thread_pool(index.threads)

    def one():
        return sum(int(v.sum(dtype=np.uint64)) for v in views)

    def threaded():
        return sum(f.result() for f in [pool.submit(lambda v=v: int(v.sum(dtype=np.uint64)))
                                        for v in views])
    return one, threaded


def report(times, base, label_width=34):
    """Print medians and ratios to the variant `base`."""
    med = {name: float(np.median(t)) for name, t in times.items()}
    for name, t in times.items():
        rounds = np.median(np.array(t) / np.array(times[base]))
        print(f'  {name:{label_width}s} median {med[name] * 1e3:9.1f} ms  '
              f'/ {base}: {med[name] / med[base]:6.2f} [{rounds:.2f}]')
    return med


def single_probe(index, flat, today, rng):
    """One probe: index, faiss, bandwidth reference (and today's search), interleaved."""
    m, q, k = FLAGS.m, FLAGS.q, FLAGS.k
    plain, threaded = bandwidth_fns(index)
    import faiss
    threads = faiss.omp_get_max_threads()
    faiss_runs = {f'faiss IndexBinaryFlat, {t} thread(s)': t for t in sorted({1, threads})}
    times = {'np.sum over the planes (1 thread)': [], 'np.sum, split over the threads': [],
             'index (ours)': [], **{name: [] for name in faiss_runs}}
    if today is not None:
        times['search() on the uint8 matrix'] = []
    for _ in range(FLAGS.repeats):
        probe = rng.integers(0, q, (1, m), dtype=np.uint8)
        times['np.sum over the planes (1 thread)'].append(timed(plain)[0])
        times['np.sum, split over the threads'].append(timed(threaded)[0])
        t, (ids, scores) = timed(lambda p=probe: index.search(p, k))
        times['index (ours)'].append(t)
        for name, t in faiss_runs.items():
            faiss.omp_set_num_threads(t)
            t, (dist, _) = timed(lambda p=probe: flat.search(one_hot(p, q), k))
            times[name].append(t)
            if int(dist[0, 0]) != 2 * (m - int(scores[0, 0])):
                raise AssertionError(f'faiss best distance {dist[0, 0]} != 2 x ours '
                                     f'{m - scores[0, 0]}')
        faiss.omp_set_num_threads(threads)
        if today is not None:
            t, ref = timed(lambda p=probe: search(today, p, k))
            times['search() on the uint8 matrix'].append(t)
            if not (np.array_equal(ref[1], scores) and np.array_equal(ref[0], ids)):
                raise AssertionError('index and search() disagree')
    print(f'one probe, top {k}, {FLAGS.repeats} rounds:')
    med = report(times, 'index (ours)')
    ours = med['index (ours)']
    faiss_ratio = min(med[name] for name in faiss_runs) / ours
    print(f'  targets: faster faiss / ours = {faiss_ratio:.2f} (>= 2), ours / np.sum = '
          f'{ours / med["np.sum over the planes (1 thread)"]:.2f} (<= 3); '
          f'{ours * 1e3 / (len(index) / 1e6):.1f} ms per million codes')


def batches(index, flat, today, rng):
    """Probe batches: index against today's search (identical answers) and, if asked, faiss."""
    m, q, k = FLAGS.m, FLAGS.q, FLAGS.k
    for num in [p for p in FLAGS.num_probes if p > 1]:
        times = {'index (ours)': []}
        if today is not None:
            times['search() on the uint8 matrix'] = []
        if FLAGS.faiss_batches:
            times['faiss IndexBinaryFlat (one-hot)'] = []
        for _ in range(FLAGS.batch_repeats):
            probes = rng.integers(0, q, (num, m), dtype=np.uint8)
            t, mine = timed(lambda p=probes: index.search(p, k))
            times['index (ours)'].append(t)
            if today is not None:
                t, ref = timed(lambda p=probes: search(today, p, k))
                times['search() on the uint8 matrix'].append(t)
                if not (np.array_equal(ref[0], mine[0]) and np.array_equal(ref[1], mine[1])):
                    raise AssertionError('index and search() disagree')
            if FLAGS.faiss_batches:
                times['faiss IndexBinaryFlat (one-hot)'].append(
                    timed(lambda p=probes: flat.search(one_hot(p, q), k))[0])
        print(f'{num} probes per call, {FLAGS.batch_repeats} rounds:')
        med = report(times, 'index (ours)')
        print(f'  index: {num / med["index (ours)"]:,.1f} queries/s')


@cli_guard
def main(_):
    """Build, check and time each gallery size."""
    if min(FLAGS.num_gallery) < 1 or FLAGS.m < 1 or not 1 <= FLAGS.q <= 256 or FLAGS.k < 1 \
            or FLAGS.repeats < 1 or FLAGS.batch_repeats < 1 or min(FLAGS.num_probes) < 1:
        raise UserError('need num_gallery, m, k, repeats, num_probes >= 1 and 1 <= q <= 256')
    logging.getLogger('faiss').setLevel(logging.WARNING)  # which SIMD module it loads
    import faiss
    print(f'numpy {np.__version__}, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} '
          f'threads), index threads {FLAGS.threads or default_threads()}, load average '
          f'{os.getloadavg()[0]:.1f}')
    rng = np.random.default_rng(FLAGS.seed)
    for n in FLAGS.num_gallery:
        index, flat, today = build(n, rng)
        single_probe(index, flat, today, rng)
        batches(index, flat, today, rng)
        del index, flat, today
        print(f'load average {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
    app.run(main)
