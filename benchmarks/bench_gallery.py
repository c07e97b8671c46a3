"""Benchmark the gallery at scale: bulk enrolment rate, identify latency, DB size; revocability.

Run: .venv/bin/python benchmarks/bench_gallery.py [--num_codes 1000000 --m 512 --q 8]
     [--db postgresql://user@host:port/dbname] [--revocability_cfg configs/quickstart_stage2.yaml]

1. `--num_codes` random codes (one subject each) go through `Gallery.enroll_bulk`, `--batch` per
   transaction (COPY on PostgreSQL): codes/s. SQLite always; PostgreSQL too with --db.
2. `identify` on a freshly opened gallery: cold (first call, reads the code matrix from the
   database) and warm (the cached matrix; the backends interleaved, median of `--repeats`),
   against `modules.deploy.search.search` on the same codes as an in-memory array in the same run.
3. DB size per template (SQLite after a WAL checkpoint; PostgreSQL tables and indexes).
4. With --revocability_cfg: faces hashed under a gallery's key, the gallery re-keyed, the same
   faces hashed again: Hamming distance between each face's old and new code, against the
   model's decision threshold and its genuine / impostor distances under one key.
"""
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.config import STAGE2_REQUIRED, load_config  # noqa: E402
from modules.deploy.gallery import Gallery, gallery_exists  # noqa: E402
from modules.deploy.search import search  # noqa: E402
from modules.deploy.store import TABLES, PostgresStore, is_postgres, open_store  # noqa: E402
from modules.utils import UserError, cli_guard  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_codes', 1_000_000, 'templates to enrol')
flags.DEFINE_integer('m', 512, 'code length')
flags.DEFINE_integer('q', 8, 'indices per group')
flags.DEFINE_integer('batch', 50_000, 'codes per bulk transaction')
flags.DEFINE_integer('top_k', 5, 'identify: top-k')
flags.DEFINE_integer('repeats', 5, 'warm identify / bare search timings (best is reported)')
flags.DEFINE_string('db', None, 'also run on this PostgreSQL database (postgresql://user@host:'
                    'port/dbname, empty; its tables are dropped at the end) against SQLite')
flags.DEFINE_string('work_dir', None, 'where the benchmark database goes (default: a temp dir)')
flags.DEFINE_string('revocability_cfg', None, 'stage-2 config of a trained model: measure '
                    'revocability on synthetic faces')
flags.DEFINE_integer('num_faces', 200, 'revocability: faces (100 identities x 2)')


def enrol(db, work, label):
    """A new gallery at `db` with --num_codes random codes (bulk transactions); its path."""
    n, m, q = FLAGS.num_codes, FLAGS.m, FLAGS.q
    key_file = os.path.join(work, f'{label}.key')
    gallery = Gallery.create(db, os.path.join(work, 'bench.yaml'), m, q, '0' * 64,
                             key_file=key_file)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for begin in range(0, n, FLAGS.batch):
        count = min(FLAGS.batch, n - begin)
        codes = rng.integers(0, q, (count, m), dtype=np.uint8)
        gallery.enroll_bulk([f'subject{i:07d}' for i in range(begin, begin + count)], codes)
    enrol_s = time.perf_counter() - start
    how = 'COPY' if isinstance(gallery.store, PostgresStore) else 'executemany'
    print(f'{label}: bulk enrolment of {n:,} codes (m={m}, q={q}) in {enrol_s:.1f} s = '
          f'{n / enrol_s:,.0f} codes/s ({FLAGS.batch:,} per transaction, {how})')
    gallery.close()
    return key_file


def db_size(gallery):
    """Bytes the gallery occupies (SQLite file after a WAL checkpoint; PostgreSQL tables with
    their indexes and TOAST)."""
    if isinstance(gallery.store, PostgresStore):
        return sum(gallery._read('SELECT pg_total_relation_size(CAST(? AS regclass))', (t,))[0][0]
                   for t in TABLES)
    gallery.store.checkpoint()
    return os.path.getsize(gallery.db_path)


def scale(work):
    """Bulk enrol, identify cold and warm (SQLite, and PostgreSQL with --db, interleaved) vs
    bare search, DB size."""
    n, m, q = FLAGS.num_codes, FLAGS.m, FLAGS.q
    dbs = {'sqlite': os.path.join(work, 'bench.sqlite')}
    if FLAGS.db is not None:
        if not is_postgres(FLAGS.db):
            raise UserError('--db: give a postgresql:// URL (SQLite always runs in --work_dir)')
        if gallery_exists(FLAGS.db):
            raise UserError(f'{FLAGS.db} already holds a gallery: give an empty database (the '
                            'benchmark drops its tables at the end)')
        dbs['postgresql'] = FLAGS.db
    galleries = {}
    try:
        for label, db in dbs.items():
            key_file = enrol(db, work, label)
            galleries[label] = Gallery.open(db, key_file)
        target = n // 3
        probe_rng = np.random.default_rng(1)
        first = next(iter(galleries.values()))

        def probe():
            code = first.templates_of(f'subject{target:07d}').copy()
            flip = probe_rng.random(m) < 0.2
            code[0, flip] = probe_rng.integers(0, q, flip.sum())
            return code

        for label, gallery in galleries.items():
            start = time.perf_counter()
            found = gallery.identify(probe(), FLAGS.top_k)
            cold = time.perf_counter() - start
            if found[0][0] != f'subject{target:07d}':
                raise AssertionError(f'{label}: identify found {found[0]}, expected '
                                     f'subject{target:07d}')
            print(f'{label}: cold identify at N = {n:,}: {cold:.2f} s (reads the code matrix '
                  'into memory)')
        # Warm identify, the backends and the bare search interleaved on the same probes:
        # median of the repeats.
        _, matrix = first.code_matrix()
        warm = {label: [] for label in galleries}
        bare = []
        for _ in range(FLAGS.repeats):
            code = probe()
            for label, gallery in galleries.items():
                start = time.perf_counter()
                gallery.identify(code, FLAGS.top_k)
                warm[label].append(time.perf_counter() - start)
            start = time.perf_counter()
            search(matrix, code, FLAGS.top_k)
            bare.append(time.perf_counter() - start)
        bare = float(np.median(bare))
        for label, times in warm.items():
            median = float(np.median(times))
            print(f'{label}: warm identify at N = {n:,}: median {median * 1e3:.1f} ms of '
                  f'{FLAGS.repeats}; bare modules.deploy.search on the in-memory array '
                  f'{bare * 1e3:.1f} ms (warm / bare = {median / bare:.2f})')
        if 'postgresql' in warm:
            ratio = float(np.median(warm['postgresql']) / np.median(warm['sqlite']))
            print(f'warm identify postgresql / sqlite = {ratio:.2f}')
        for label, gallery in galleries.items():
            size = db_size(gallery)
            print(f'{label}: DB size {size / 1e6:,.1f} MB = {size / n:.0f} bytes per template '
                  f'({m} bytes of codes + name, key id, model fingerprint, timestamps, audit row)')
    finally:
        for gallery in galleries.values():
            gallery.close()
        if 'postgresql' in dbs:
            drop_tables(dbs['postgresql'])


def drop_tables(db):
    """Remove the benchmark's gallery from the PostgreSQL database."""
    store = open_store(db)
    try:
        with store.write() as tx:
            tx.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES)}")
    finally:
        store.close()


def revocability(work, cfg_path):
    """Old vs new code of the same faces across a gallery rekey, on a trained model."""
    from modules.utils import quiet_tensorflow
    quiet_tensorflow()
    from modules.deploy.decision import decision_threshold
    from modules.deploy.hashing import Hasher
    from modules.evaluations import pair_distances
    cfg = load_config(cfg_path, STAGE2_REQUIRED)
    threshold, source = decision_threshold(cfg)
    gallery = Gallery.create(os.path.join(work, 'revoke.sqlite'), cfg_path, cfg['m'], cfg['q'],
                             Hasher(cfg, None).fingerprint)
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'make_synthetic_faces', os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), 'data', 'make_synthetic_faces.py'))
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    ids = np.arange(FLAGS.num_faces)
    faces = np.ascontiguousarray(generator.draw_images(0, 'lfw', ids // 2, ids % 2)[0][..., ::-1])
    old = Hasher(cfg, gallery.key).codes(faces)
    gallery.enroll_bulk([f'id{i // 2}_{i % 2}' for i in ids], old)
    gallery.rekey()
    new = Hasher(cfg, gallery.key).codes(faces)
    cross = pair_distances(old, new, 'Hamming')
    genuine = pair_distances(old[0::2], old[1::2], 'Hamming')
    impostor = pair_distances(old[0::2], np.roll(old[1::2], 1, axis=0), 'Hamming')
    m = cfg['m']
    print(f"revocability, {cfg_path} (m={m}, q={cfg['q']}), {len(faces)} synthetic faces:")
    print(f'  threshold {threshold:g} ({source})')
    print(f'  same face, old key vs new key: Hamming {cross.min():.0f}..{cross.max():.0f} '
          f'(mean {cross.mean():.1f}); matches at the threshold: {int(np.sum(cross <= threshold))}'
          f' of {len(cross)}')
    print(f'  one key: genuine pairs mean {genuine.mean():.1f}, impostor pairs mean '
          f"{impostor.mean():.1f}; chance level m(1 - 1/q) = {m * (1 - 1 / cfg['q']):.0f}")


@cli_guard
def main(_):
    """Run the scale benchmark and, if asked, the revocability measurement."""
    if FLAGS.num_codes < 1 or FLAGS.batch < 1 or FLAGS.repeats < 1:
        raise UserError('need num_codes, batch, repeats >= 1')
    with tempfile.TemporaryDirectory(dir=FLAGS.work_dir) as work:
        if FLAGS.revocability_cfg:
            revocability(work, FLAGS.revocability_cfg)
        scale(work)


if __name__ == '__main__':
    app.run(main)
