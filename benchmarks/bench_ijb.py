"""Benchmark: IJB-C scoring at the real sizes, on synthetic features.

469,375 image features x 512, 23,124 templates, 15,658,489 template pairs (19,557 genuine): read
the meta files (written to a temporary folder in the real format), pool the templates, score every
pair (float cosine and IoM m=512 q=8 Hamming similarity) and read TAR@FAR off the ROC. The plain
loop over templates (InsightFace's way) runs on a subset of templates, for the speed-up ratio.

IJB-C's 1:1 protocol compares the 3,531 gallery (enrolment) templates, one per subject, with the
19,593 probe templates (3,531 + 19,593 = 23,124): the pairs here are drawn from that grid. The
cosine scoring is also timed on the worst case for its dense blocks, pairs spread uniformly over
all 23,124 x 23,124 template pairs.
Run from the repository root: `.venv/bin/python benchmarks/bench_ijb.py`.
"""
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules import ijb  # noqa: E402

N_IMAGES, DIM, N_TEMPLATES, N_PAIRS, N_GENUINE = 469_375, 512, 23_124, 15_658_489, 19_557
N_GALLERY = 3_531
N_MEDIAS = 141_332  # about six images per media
LOOP_TEMPLATES = 2_000
IOM_M, IOM_Q = 512, 8


def timed(label, fn, *args, **kwargs):
    """Run fn once, print wall and CPU time (all threads), return (wall seconds, result).

    The CPU time is the fairer figure on a shared machine: the wall time grows with the load.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f'{label:<52s} {seconds:7.2f} s wall {cpu:7.2f} s CPU', flush=True)
    return seconds, out


def synthetic_set(rng):
    """Template / media ids per image, features, faceness and template pairs of IJB-C's sizes."""
    # Six-digit template ids, as wide as IJB-C's largest; every template has at least one image.
    template_ids = np.sort(rng.choice(np.arange(100_000, 1_000_000), N_TEMPLATES, replace=False))
    templates = np.r_[template_ids, rng.choice(template_ids, N_IMAGES - N_TEMPLATES)]
    medias = rng.integers(0, N_MEDIAS, N_IMAGES)
    feats = rng.standard_normal((N_IMAGES, DIM), dtype=np.float32)
    faceness = rng.uniform(0.5, 1.0, N_IMAGES).astype(np.float32)
    gallery, probes = template_ids[:N_GALLERY], template_ids[N_GALLERY:]
    cells = rng.choice(N_GALLERY * probes.size, N_PAIRS, replace=False)
    pairs = np.stack([gallery[cells // probes.size], probes[cells % probes.size]], axis=1)
    labels = np.zeros(N_PAIRS, bool)
    labels[rng.choice(N_PAIRS, N_GENUINE, replace=False)] = True
    return templates, medias, feats, faceness, pairs, labels


def write_pair_file(path, pairs, labels):
    """`t1 t2 label` lines, formatted with numpy digit arithmetic (ids have six digits)."""
    line = np.empty((len(pairs), 16), np.uint8)
    for col, ids in ((0, pairs[:, 0]), (7, pairs[:, 1])):
        for k in range(6):
            line[:, col + k] = ids // 10 ** (5 - k) % 10 + ord('0')
    line[:, 6] = line[:, 13] = ord(' ')
    line[:, 14] = labels + ord('0')
    line[:, 15] = ord('\n')
    line.tofile(path)


def write_image_files(folder, templates, medias, faceness, rng):
    """The face/template/media list and the five-point landmark file for every image."""
    names = [f'{i + 1}.jpg' for i in range(N_IMAGES)]
    with open(os.path.join(folder, 'tid_mid.txt'), 'w') as fh:
        fh.write(''.join(f'{n} {t} {m}\n' for n, t, m in zip(names, templates.tolist(),
                                                               medias.tolist())))
    points = rng.uniform(20, 180, (N_IMAGES, 10)).round(3)
    rows = np.column_stack([points, faceness.round(5)]).astype(str)
    with open(os.path.join(folder, 'landmarks.txt'), 'w') as fh:
        fh.write(''.join(f'{n} {" ".join(r)}\n' for n, r in zip(names, rows.tolist())))


def main():
    """Print the time of every stage and the loop / vectorised speed-up of the pooling."""
    print(f'load average before: {os.getloadavg()[0]:.2f} (2 cores shared with other jobs)')
    rng = np.random.default_rng(0)
    templates, medias, feats, faceness, pairs, labels = synthetic_set(rng)
    with tempfile.TemporaryDirectory() as folder:
        pair_path = os.path.join(folder, 'pairs.txt')
        write_pair_file(pair_path, pairs, labels)
        write_image_files(folder, templates, medias, faceness, rng)
        size = os.path.getsize(pair_path) / 1e6
        _, (read_pairs, read_labels) = timed(f'read pair file ({N_PAIRS:,} lines, {size:.0f} MB)',
                                             ijb.read_template_pairs, pair_path)
        assert np.array_equal(read_pairs, pairs) and np.array_equal(read_labels, labels)
        timed(f'read face/template/media list ({N_IMAGES:,} lines)', ijb.read_face_tid_mid,
              os.path.join(folder, 'tid_mid.txt'))
        timed(f'read landmark file ({N_IMAGES:,} lines)', ijb.read_landmarks,
              os.path.join(folder, 'landmarks.txt'))

    pool_s, (template_ids, template_feats) = timed(
        f'template pooling ({N_IMAGES:,} x {DIM} -> {N_TEMPLATES:,})', ijb.template_features,
        feats, templates, medias, faceness)
    subset = np.isin(templates, template_ids[:LOOP_TEMPLATES])
    args = (feats[subset], templates[subset], medias[subset], faceness[subset])
    loop_s, (_, loop_feats) = timed(f'plain loop, {LOOP_TEMPLATES:,} templates '
                                    f'({subset.sum():,} images)', ijb.template_features_loop,
                                    *args)
    vec_s, (_, vec_feats) = timed(f'vectorised, same {LOOP_TEMPLATES:,} templates',
                                  ijb.template_features, *args)
    assert np.allclose(loop_feats, vec_feats, atol=1e-5)
    print(f'pooling speed-up on the subset: {loop_s / vec_s:.0f}x')

    score_s, scores = timed(f'cosine scores, {N_PAIRS:,} pairs', ijb.pair_scores,
                            template_feats, template_ids, pairs)
    check = rng.choice(N_PAIRS, 1000, replace=False)
    rows = np.searchsorted(template_ids, pairs[check])
    direct = np.einsum('ij,ij->i', template_feats[rows[:, 0]], template_feats[rows[:, 1]])
    assert np.allclose(scores[check], direct, atol=1e-5)
    uniform = rng.choice(template_ids, (N_PAIRS, 2))
    timed('cosine scores, worst case (uniform over all pairs)', ijb.pair_scores, template_feats,
          template_ids, uniform)
    codes = rng.integers(0, IOM_Q, (N_TEMPLATES, IOM_M))
    ham_s, _ = timed(f'IoM Hamming similarity m={IOM_M} q={IOM_Q}, {N_PAIRS:,} pairs',
                     ijb.pair_scores, codes, template_ids, pairs, 'Hamming')
    tar_s, _ = timed(f'TAR@FAR (ROC of {N_PAIRS:,} scores)', ijb.tar_at_far, scores, labels)
    print(f'load average after: {os.getloadavg()[0]:.2f}')
    print(f'targets: pooling {pool_s:.2f} s (< 5), cosine scores {score_s:.2f} s (< 10), '
          f'Hamming scores {ham_s:.2f} s, TAR@FAR {tar_s:.2f} s (< 5)')


if __name__ == '__main__':
    main()
