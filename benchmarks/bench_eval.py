"""Benchmark: vectorised 10-fold verification protocol vs a loop over folds and thresholds.

6,000 pairs of 512-d random embeddings (half genuine, with some signal), cosine distances,
400 thresholds, 10 folds. Run from the repository root: `.venv/bin/python benchmarks/bench_eval.py`.
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules import evaluations as E  # noqa: E402

N_PAIRS, DIM, N_FOLDS = 6000, 512, 10
THRESHOLDS = np.arange(0, 4, 0.01)  # 400 values, the research code's grid


def make_pairs(seed=0):
    """Random embedding pairs; genuine pairs share a common component (the signal)."""
    rng = np.random.default_rng(seed)
    issame = np.arange(N_PAIRS) % 2 == 0
    a = rng.normal(size=(N_PAIRS, DIM))
    noise = rng.normal(size=(N_PAIRS, DIM))
    b = np.where(issame[:, None], 0.12 * a + np.sqrt(1 - 0.12 ** 2) * noise, noise)
    return E.pair_distances(a, b, 'cosine'), issame


def loop_protocol(dist, issame, thresholds, nrof_folds=N_FOLDS):
    """The research code's way: for each fold, for each threshold, numpy accuracy."""
    fold = E.kfold_ids(dist.size, nrof_folds)
    accuracies, best_thresholds = np.zeros(nrof_folds), np.zeros(nrof_folds)
    for k in range(nrof_folds):
        train, test = fold != k, fold == k
        acc_train = np.zeros(len(thresholds))
        for t_idx, threshold in enumerate(thresholds):
            pred = np.less(dist[train], threshold)
            tp = np.sum(np.logical_and(pred, issame[train]))
            tn = np.sum(np.logical_and(~pred, ~issame[train]))
            acc_train[t_idx] = (tp + tn) / train.sum()
        best = int(np.argmax(acc_train))
        pred = np.less(dist[test], thresholds[best])
        accuracies[k] = np.mean(pred == issame[test])
        best_thresholds[k] = thresholds[best]
    return accuracies.mean(), best_thresholds.mean()


def best_time(fn, repeats):
    """Fastest of `repeats` runs, in seconds, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main():
    """Time both implementations and print the speed-up and whether they agree."""
    dist, issame = make_pairs()
    t_loop, (acc_loop, thr_loop) = best_time(lambda: loop_protocol(dist, issame, THRESHOLDS), 3)
    t_vec, res = best_time(lambda: E.verification_metrics(dist, issame, N_FOLDS, THRESHOLDS), 20)
    ratio = t_loop / t_vec
    agree = (np.isclose(res['accuracy'], acc_loop, rtol=0, atol=1e-12)
             and np.isclose(res['threshold'], thr_loop, rtol=0, atol=1e-12))
    print(f'pairs {N_PAIRS}, dim {DIM}, thresholds {len(THRESHOLDS)}, folds {N_FOLDS}')
    print(f'loop over folds x thresholds : {t_loop * 1e3:9.2f} ms  '
          f'(accuracy {acc_loop:.4f}, threshold {thr_loop:.4f})')
    print(f'vectorised engine (+EER/AUC/TAR): {t_vec * 1e3:9.2f} ms  '
          f"(accuracy {res['accuracy']:.4f}, threshold {res['threshold']:.4f}, "
          f"EER {res['eer']:.4f}, AUC {res['auc']:.4f})")
    print(f'speed-up: {ratio:.1f}x  (target >= 20x)')
    print(f'accuracy and threshold agree: {agree}')
    return 0 if agree and ratio >= 20 else 1


if __name__ == '__main__':
    sys.exit(main())
