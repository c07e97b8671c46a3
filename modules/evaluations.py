"""Evaluation engine: code distances, verification and retrieval metrics, embedding extraction and
reports (the test sets are read by `modules.testsets`).

Every script measures through `evaluate_verification` / `evaluate_retrieval`, so one protocol is
used everywhere:

- Verification: pair i is images 2i and 2i+1; a pair is predicted "same" when its distance is
  strictly below the threshold. Accuracy follows the 10-fold protocol (KFold without shuffling
  over pairs: the best threshold of the other nine folds is applied to the held-out fold); EER, AUC
  and TAR@FAR come from the ROC over all pairs (score = -distance).
- Retrieval: every item queries all the others; mAP and CMC rank-1/5/10.
"""
import hashlib
import json
import os
import re
import sys

import numpy as np
from tqdm import tqdm

from modules.testsets import as_bool_array
from modules.utils import UserError, atomic_output, atomic_path

_DISPLAY_NAMES = {'lfw': 'LFW', 'agedb_30': 'AgeDB30', 'cfp_fp': 'CFP-FP', 'cfp_ff': 'CFP-FF'}
MEASURES = ('cosine', 'Euclidean', 'Hamming', 'Jaccard', 'LUT')
_CODE_MEASURES = ('Hamming', 'Jaccard', 'LUT')
TAR_FARS = (1e-3, 1e-4)
DEFAULT_NUM_THRESHOLDS = 400
# face.evoLVe's test-time crop resizes 112 -> 128 and keeps the central 112: the same field of view
# as cropping the central 112 * 112 / 128 = 98 pixels and resizing them back to 112.
CCROP_SIZE = 98


# ---------------------------------------------------------------------------------------------
# Distances
def _check_measure(measure):
    if measure not in MEASURES:
        raise UserError(f'unknown distance measure {measure!r}; expected one of '
                        + ', '.join(MEASURES))


def _as_2d(x, what):
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise UserError(f'{what} must be a 2-D array (items, features), got shape {arr.shape}')
    if arr.dtype.kind not in 'biuf':
        raise UserError(f'{what} must be numeric, got dtype {arr.dtype}')
    if arr.dtype.kind == 'f' and not np.isfinite(arr).all():
        raise UserError(f'{what} contain NaN or infinite values')
    return arr


def _as_codes(x, measure, q, what):
    """Integer IoM codes in [0, q); float arrays are accepted when they hold whole numbers."""
    arr = _as_2d(x, what)
    if arr.dtype.kind == 'f':
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise UserError(f'{what}: measure {measure!r} needs integer IoM codes, '
                            'got non-integer values')
        arr = rounded
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise UserError(f'{what}: IoM codes must be >= 0, got {arr.min()}')
    if q is not None and arr.size and arr.max() >= q:
        raise UserError(f'{what}: IoM codes must be < q={q}, got {arr.max()}')
    return arr


def _lut_bits(q):
    if q is None or int(q) != q or q < 2 or (int(q) & (int(q) - 1)):
        raise UserError(f"measure 'LUT' needs q, a power of 2 >= 2; got q={q}")
    return int(q).bit_length() - 1


def _check_pair_shapes(a, b):
    if a.shape[1] != b.shape[1]:
        raise UserError(f'cannot compare {a.shape[1]}-d with {b.shape[1]}-d embeddings/codes')


def _l2_normalise(x):
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def pair_distances(emb1, emb2, measure='Euclidean', q=None):
    """Row-wise distance between two (N, d) arrays of embeddings or IoM codes."""
    _check_measure(measure)
    if measure == 'LUT':
        _lut_bits(q)
    if measure in _CODE_MEASURES:
        a, b = _as_codes(emb1, measure, q, 'emb1'), _as_codes(emb2, measure, q, 'emb2')
    else:
        a, b = _as_2d(emb1, 'emb1'), _as_2d(emb2, 'emb2')
    _check_pair_shapes(a, b)
    if a.shape[0] != b.shape[0]:
        raise UserError(f'pair_distances needs the same number of rows, got {a.shape[0]} and '
                        f'{b.shape[0]}')
    if measure == 'cosine':
        return np.linalg.norm(_l2_normalise(a) - _l2_normalise(b), axis=1)
    if measure == 'Euclidean':
        return np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=1)
    if measure == 'Hamming':
        return np.count_nonzero(a != b, axis=1).astype(np.float64)
    if measure == 'Jaccard':
        # One-hot LUT: each code sets m of m*q bits; equal indices share their bit.
        m = a.shape[1]
        shared = np.count_nonzero(a == b, axis=1).astype(np.float64)
        return 1.0 - shared / (2 * m - shared)
    return np.bitwise_count(a ^ b).sum(axis=1).astype(np.float64)


def _features(x, measure, q, what):
    """Per-item features from which `_matrix` builds distances with one matrix product."""
    if measure == 'cosine':
        return _l2_normalise(_as_2d(x, what))
    if measure == 'Euclidean':
        return np.asarray(_as_2d(x, what), np.float64)
    codes = _as_codes(x, measure, q, what)
    n, m = codes.shape
    if measure == 'LUT':
        bits = _lut_bits(q)
        expanded = (codes[:, :, None] >> np.arange(bits)) & 1
        return expanded.reshape(n, m * bits).astype(np.float32)
    # float32 is exact here: products of 0/1 summed over at most m*q terms (< 2**24).
    onehot = np.zeros((n, m * q), np.float32)
    onehot[np.arange(n)[:, None], np.arange(m) * q + codes] = 1.0
    return onehot


def _matrix(fa, fb, measure, m=None):
    if measure in ('cosine', 'Euclidean'):
        sq = (fa * fa).sum(1)[:, None] + (fb * fb).sum(1)[None, :] - 2.0 * (fa @ fb.T)
        return np.sqrt(np.maximum(sq, 0.0))
    inner = (fa @ fb.T).astype(np.float64)
    if measure == 'LUT':
        return fa.sum(1, dtype=np.float64)[:, None] + fb.sum(1, dtype=np.float64)[None, :] \
            - 2.0 * inner
    if measure == 'Hamming':
        return m - inner
    return 1.0 - inner / (2 * m - inner)


def _infer_q(measure, q, *arrays):
    if measure in ('Hamming', 'Jaccard') and q is None:
        return int(max(int(np.max(np.asarray(a))) for a in arrays if np.size(a))) + 1
    return q


def distance_matrix(a, b, measure, q=None):
    """(Na, Nb) matrix of the distances `pair_distances` computes row-wise."""
    _check_measure(measure)
    a2, b2 = _as_2d(a, 'a'), _as_2d(b, 'b')
    _check_pair_shapes(a2, b2)
    q = _infer_q(measure, q, a2, b2)
    return _matrix(_features(a2, measure, q, 'a'), _features(b2, measure, q, 'b'), measure,
                   a2.shape[1])


# ---------------------------------------------------------------------------------------------
# Verification
def kfold_ids(n, nrof_folds=10):
    """Fold index of each of n items, as sklearn KFold(n_splits, shuffle=False) splits them."""
    if n < nrof_folds:
        raise UserError(f'{n} pairs cannot be split into {nrof_folds} folds')
    sizes = np.full(nrof_folds, n // nrof_folds)
    sizes[:n % nrof_folds] += 1
    return np.repeat(np.arange(nrof_folds), sizes)


def default_thresholds(distances, num=DEFAULT_NUM_THRESHOLDS):
    """`num` evenly spaced thresholds from the smallest distance to one step past the largest.

    The extra step lets "every pair is the same person" (d < t for all d) be a candidate too.
    """
    lo, hi = float(np.min(distances)), float(np.max(distances))
    if hi <= lo:
        hi = lo + 1.0
    step = (hi - lo) / (num - 1)
    return np.linspace(lo, hi + step, num)


def roc_curve(distances, issame):
    """ROC over all pairs (score = -distance): (fpr, tpr, thresholds), one point per distinct
    distance, starting at (0, 0); a pair counts as accepted when its distance is <= threshold."""
    d = np.asarray(distances)
    # float32 distances sort as they are (twice as fast; the same order and ties as in float64).
    d = d if d.dtype == np.float32 else np.asarray(d, np.float64)
    same = np.asarray(issame, bool)
    # Sort the distances alone and count genuine pairs by binary search: tied distances are one
    # ROC point, so no stable argsort is needed, and on IJB-C's 15.6 M pairs this is ~3x faster.
    d_sorted = np.sort(d)
    last = np.r_[np.flatnonzero(np.diff(d_sorted)), d.size - 1]
    tp = np.searchsorted(np.sort(d[same]), d_sorted[last], side='right')
    fp = last + 1 - tp
    tpr = np.r_[0.0, tp / same.sum()]
    fpr = np.r_[0.0, fp / (~same).sum()]
    return fpr, tpr, np.r_[-np.inf, d_sorted[last].astype(np.float64)]


def equal_error_rate(fpr, tpr):
    """Where the ROC polyline crosses FAR = FRR (linear interpolation between ROC points)."""
    gap = fpr - (1.0 - tpr)  # non-decreasing from -1 to +1 along the curve
    i = int(np.argmax(gap >= 0))
    if gap[i] == 0 or i == 0:
        return float(fpr[i])
    frac = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + frac * (fpr[i] - fpr[i - 1]))


def verification_metrics(distances, issame, nrof_folds=10, thresholds=None):
    """10-fold accuracy, mean threshold, EER, AUC, TAR@FAR and the ROC of pair distances."""
    d = np.asarray(distances, np.float64).ravel()
    same = np.asarray(issame).ravel()
    if same.dtype != bool:
        same = as_bool_array(same, 'issame')
    if d.size != same.size:
        raise UserError(f'{d.size} distances for {same.size} pair labels')
    if not np.isfinite(d).all():
        raise UserError('distances contain NaN or infinite values')
    if same.all() or not same.any():
        raise UserError('verification needs both genuine and impostor pairs')
    thresholds = (default_thresholds(d) if thresholds is None
                  else np.asarray(thresholds, np.float64).ravel())
    fold = kfold_ids(d.size, nrof_folds)

    # For every (threshold, fold) count the genuine pairs below the threshold and the impostor
    # pairs at or above it, from cumulative per-fold counts over the sorted distances.
    order = np.argsort(d, kind='stable')
    d_sorted = d[order]
    rows = np.arange(1, d.size + 1)
    gen = np.zeros((d.size + 1, nrof_folds), np.int64)
    imp = np.zeros((d.size + 1, nrof_folds), np.int64)
    gen[rows, fold[order]] = same[order]
    imp[rows, fold[order]] = ~same[order]
    gen, imp = np.cumsum(gen, axis=0), np.cumsum(imp, axis=0)
    below = np.searchsorted(d_sorted, thresholds, side='left')  # count of d < t
    gen_below = gen[below]                                       # (T, K)
    imp_at_or_above = imp[-1][None, :] - imp[below]              # (T, K)
    correct = gen_below + imp_at_or_above                        # per fold, per threshold
    train_correct = correct.sum(axis=1, keepdims=True) - correct  # the other folds
    best = np.argmax(train_correct, axis=0)  # the first best, as the research code's loop chose
    fold_sizes = np.bincount(fold, minlength=nrof_folds)
    fold_acc = correct[best, np.arange(nrof_folds)] / fold_sizes
    fold_thr = thresholds[best]

    fpr, tpr, roc_thr = roc_curve(d, same)
    eer_point = int(np.argmax(fpr - (1.0 - tpr) >= 0))  # first ROC point with FAR >= FRR
    return {
        'accuracy': float(fold_acc.mean()),
        'accuracy_std': float(fold_acc.std()),
        'threshold': float(fold_thr.mean()),
        'eer': equal_error_rate(fpr, tpr),
        'auc': float(np.trapezoid(tpr, fpr)),
        # Highest TAR among ROC points whose FAR does not exceed the target.
        'tar_at_far': {far: float(tpr[fpr <= far].max()) for far in TAR_FARS},
        'fold_accuracies': fold_acc,
        'fold_thresholds': fold_thr,
        # Accept when distance <= threshold, as on the ROC (the gallery's decision rule).
        'eer_threshold': float(roc_thr[max(eer_point, 1)]),
        'roc_far': fpr[1:],
        'roc_thresholds': roc_thr[1:],
        'fpr': fpr,
        'tpr': tpr,
    }


def threshold_at_far(roc_far, roc_thresholds, far):
    """(threshold, its measured FAR): the largest ROC threshold whose FAR is <= `far`."""
    if not 0 < far < 1:
        raise UserError(f'a target FAR must lie in (0, 1), got {far}')
    roc_far = np.asarray(roc_far, np.float64)
    allowed = np.flatnonzero(roc_far <= far)
    if allowed.size == 0:
        raise UserError(f'no threshold reaches FAR <= {far:g} (lowest FAR {roc_far.min():.2e})')
    return float(np.asarray(roc_thresholds)[allowed[-1]]), float(roc_far[allowed[-1]])


# ---------------------------------------------------------------------------------------------
# Retrieval
def retrieval_metrics(codes_or_embeddings, labels, measure, q=None, chunk_elements=1 << 22):
    """mAP and CMC rank-1/5/10 when every item queries all the others (itself excluded).

    Ties in distance are ranked by item index (stable sort), so results are deterministic.
    Queries whose identity has no other item are left out of both metrics.
    """
    _check_measure(measure)
    x = _as_2d(codes_or_embeddings, 'codes_or_embeddings')
    labels = np.asarray(labels).ravel()
    n = x.shape[0]
    if labels.size != n:
        raise UserError(f'{n} items for {labels.size} labels')
    if n < 2:
        raise UserError('retrieval needs at least two items')
    q = _infer_q(measure, q, x)
    feats = _features(x, measure, q, 'codes_or_embeddings')
    label_ids = np.unique(labels, return_inverse=True)[1]
    has_match = np.bincount(label_ids)[label_ids] > 1
    if not has_match.any():
        raise UserError('retrieval needs at least one identity with two or more items')
    ranks = (1, 5, 10)
    ap_sum, hits, n_queries = 0.0, np.zeros(len(ranks)), 0
    chunk = max(1, chunk_elements // n)
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        idx = idx[has_match[idx]]
        if idx.size == 0:
            continue
        dist = _matrix(feats[idx], feats, measure, x.shape[1])
        dist[np.arange(idx.size), idx] = np.inf  # the query itself goes last, then is dropped
        order = np.argsort(dist, axis=1, kind='stable')[:, :-1]
        relevant = labels[order] == labels[idx][:, None]
        cum = np.cumsum(relevant, axis=1)
        precision = cum / np.arange(1, n)[None, :]
        ap_sum += float(((precision * relevant).sum(1) / cum[:, -1]).sum())
        first_hit = np.argmax(relevant, axis=1)
        hits += (first_hit[:, None] < np.asarray(ranks)[None, :]).sum(0)
        n_queries += idx.size
    return {'map': ap_sum / n_queries,
            'cmc': {r: float(h / n_queries) for r, h in zip(ranks, hits)},
            'n_queries': n_queries}


# ---------------------------------------------------------------------------------------------
# Extraction
def _bilinear_weights(out_size, crop_start, crop_size, in_size):
    """(out, in) matrix resizing the window [crop_start, crop_start + crop_size) bilinearly
    (half-pixel centres, clamped at the window edge: what cv2.INTER_LINEAR does on the crop)."""
    last = crop_start + crop_size - 1
    centres = (np.arange(out_size) + 0.5) * crop_size / out_size - 0.5 + crop_start
    centres = np.clip(centres, crop_start, last)  # crop first: nothing outside the window leaks in
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, last)
    frac = centres - low
    weights = np.zeros((out_size, in_size))
    np.add.at(weights, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), high), frac)
    return weights


def central_crop(images, crop_size=CCROP_SIZE):
    """Crop the central `crop_size` square of each image and resize it back (bilinear)."""
    images = np.asarray(images, np.float32)
    h, w = images.shape[1:3]
    wy = _bilinear_weights(h, (h - crop_size) // 2, crop_size, h).astype(np.float32)
    wx = _bilinear_weights(w, (w - crop_size) // 2, crop_size, w).astype(np.float32)
    return np.einsum('iy,nyxc,jx->nijc', wy, images, wx, optimize=True)


def _call(model, batch):
    keras = sys.modules.get('keras')
    if keras is not None and isinstance(model, keras.Layer):
        out = model(batch, training=False)
    else:
        out = model(batch)
    out = np.asarray(out.numpy() if hasattr(out, 'numpy') else out)
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise UserError(f'the model must map a ({batch.shape[0]}, H, W, 3) batch to '
                        f'({batch.shape[0]}, d) outputs, got shape {out.shape}')
    return out


def extract_embeddings(model, images, batch_size=64, is_flip=False, is_ccrop=False,
                       progress=True):
    """Run `model` over `images` in batches: (N, d) numpy outputs, with optional test-time
    central crop (`central_crop`) and horizontal-flip sum."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f'images must have shape (N, H, W, 3), got {images.shape}')
    if batch_size < 1:
        raise UserError(f'batch_size must be positive, got {batch_size}')
    outputs = []
    starts = range(0, images.shape[0], batch_size)
    for start in tqdm(starts, desc='embeddings', leave=False, disable=not progress):
        batch = np.asarray(images[start:start + batch_size], np.float32)
        if is_ccrop:
            batch = central_crop(batch)
        out = _call(model, batch)
        if is_flip:
            out = out + _call(model, np.ascontiguousarray(batch[:, :, ::-1, :]))
        outputs.append(out)
    if not outputs:
        raise UserError('no images to embed')
    return np.concatenate(outputs, axis=0)


# ---------------------------------------------------------------------------------------------
# Evaluation paths shared by every script
def evaluate_verification(embed_fn, val_sets, measure, q=None, batch_size=64, is_flip=False,
                          is_ccrop=False, progress=True):
    """Embed each verification set and measure it: {set: metrics + 'distances' + 'issame'}."""
    _check_measure(measure)
    results = {}
    for name, (images, issame) in val_sets.items():
        emb = extract_embeddings(embed_fn, images, batch_size, is_flip, is_ccrop, progress)
        results[name] = evaluate_pairs(emb, issame, measure, q)
    return results


def evaluate_pairs(features, issame, measure, q=None):
    """Metrics + 'distances' + 'issame' of pairs (rows 2i, 2i+1) of embeddings or codes."""
    dist = pair_distances(features[0::2], features[1::2], measure, q)
    metrics = verification_metrics(dist, issame)
    metrics['distances'] = dist
    metrics['issame'] = np.asarray(issame, bool)
    return metrics


def evaluate_retrieval(embed_fn, images, labels, measure, q=None, batch_size=64, is_flip=False,
                       is_ccrop=False, progress=True):
    """Embed an identity-folder set and measure retrieval: {'map', 'cmc', 'n_queries'}."""
    _check_measure(measure)
    emb = extract_embeddings(embed_fn, images, batch_size, is_flip, is_ccrop, progress)
    return retrieval_metrics(emb, labels, measure, q)


# ---------------------------------------------------------------------------------------------
# Reports
def _far_key(far):
    return f'{far:.0e}'


def format_table(results):
    """Markdown table of verification results: one column per set, 4 decimals."""
    names = list(results)
    rows = [('Accuracy', lambda r: r['accuracy']), ('EER', lambda r: r['eer']),
            ('AUC', lambda r: r['auc']), ('Threshold', lambda r: r['threshold'])]
    rows += [(f'TAR@FAR={_far_key(far)}', lambda r, f=far: r['tar_at_far'][f])
             for far in TAR_FARS]
    header = [''] + [_DISPLAY_NAMES.get(n, n) for n in names]
    body = [[label] + [f'{get(results[n]):.4f}' for n in names] for label, get in rows]
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

    def line(cells):
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' |'

    sep = '|' + '|'.join('-' * (w + 2) for w in widths) + '|'
    return '\n'.join([line(header), sep] + [line(row) for row in body])


def format_retrieval_table(results):
    """Markdown table of retrieval results: one row per set (mAP, CMC rank-1/5/10)."""
    lines = ['| Set | mAP | Rank-1 | Rank-5 | Rank-10 |', '|---|---|---|---|---|']
    for name, r in results.items():
        cmc = r['cmc']
        lines.append(f"| {name} | {r['map']:.4f} | {cmc[1]:.4f} | {cmc[5]:.4f} | "
                     f'{cmc[10]:.4f} |')
    return '\n'.join(lines)


def _json_metrics(metrics):
    out = {}
    for key, value in metrics.items():
        if isinstance(value, np.ndarray) and key not in ('fold_accuracies', 'fold_thresholds',
                                                         'roc_far', 'roc_thresholds'):
            continue  # distances, labels and ROC arrays stay out of the JSON
        if isinstance(value, dict):
            out[key] = {(_far_key(k) if isinstance(k, float) else str(k)): float(v)
                        for k, v in value.items()}
        elif isinstance(value, np.ndarray):
            out[key] = [float(v) for v in value]
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        else:
            out[key] = float(value)
    return out


def _plot_set(name, metrics, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    ax_roc, ax_hist = fig.subplots(1, 2)
    fpr, tpr = metrics['fpr'], metrics['tpr']
    keep = fpr > 0  # the log axis cannot show FAR = 0
    ax_roc.plot(fpr[keep], tpr[keep], lw=1.5)
    ax_roc.set_xscale('log')
    ax_roc.set_xlabel('False accept rate')
    ax_roc.set_ylabel('True accept rate')
    ax_roc.set_title(f"{_DISPLAY_NAMES.get(name, name)} ROC (AUC {metrics['auc']:.4f}, "
                     f"EER {metrics['eer']:.4f})")
    ax_roc.grid(True, which='both', alpha=0.3)
    dist, same = metrics['distances'], metrics['issame']
    bins = np.linspace(dist.min(), dist.max(), 60) if dist.max() > dist.min() else 10
    ax_hist.hist(dist[same], bins=bins, alpha=0.6, label='genuine', color='tab:green')
    ax_hist.hist(dist[~same], bins=bins, alpha=0.6, label='impostor', color='tab:red')
    ax_hist.axvline(metrics['threshold'], color='k', ls='--',
                    label=f"threshold {metrics['threshold']:.4f}")
    ax_hist.set_xlabel('distance')
    ax_hist.set_ylabel('pairs')
    ax_hist.set_title(f"accuracy {metrics['accuracy']:.4f}")
    ax_hist.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)


def results_dir(out_dir, test_dataset):
    """`<out_dir>/results/<folder name>-<8 hex digits of its real path>`: where the results on
    one test folder go, apart from those of any other folder."""
    real = os.path.realpath(test_dataset)
    name = re.sub(r'[^\w.-]', '_', os.path.basename(real.rstrip(os.sep))) or 'root'
    return os.path.join(out_dir, 'results', f'{name}-{hashlib.sha256(real.encode()).hexdigest()[:8]}')


def write_reports(results, out_dir, prefix, test_dataset, default_dataset):
    """Write one `<prefix>_<set>.json` (with the test folder) and PNG per set into results_dir,
    and, for a run on the config's own test folder, the summary `write_report` writes beside
    (what the gallery and the quickstart read). Return the written paths."""
    folder = results_dir(out_dir, test_dataset)
    paths = []
    for name, metrics in results.items():
        path = os.path.join(folder, f'{prefix}_{name}.json')
        record = {'set': name, 'test_dataset': os.path.realpath(test_dataset),
                  **_json_metrics(metrics)}
        with atomic_output(path, 'w') as fh:
            json.dump(record, fh, indent=2, sort_keys=True)
        png = os.path.join(folder, f'{prefix}_{name}.png')
        _plot_set(name, metrics, png)
        paths += [path, png]
    if os.path.realpath(test_dataset) == os.path.realpath(default_dataset):
        paths += write_report(results, out_dir, prefix)
    return paths


def comparison_record(rows, labels, **about):
    """JSON-ready comparison: {'rows': {key: label}, 'sets': {set: {key: metrics}}, **about}.

    `rows` maps a row key ('float', 'learned', 'random') to its {set: metrics} results."""
    names = list(next(iter(rows.values())))
    return {**about, 'rows': dict(labels),
            'sets': {name: {key: _json_metrics(rows[key][name]) for key in rows} for name in names}}


def format_comparison(record):
    """Markdown table of a comparison_record: per set, one row per template (Accuracy, EER, AUC)."""
    lines = ['| set | template | Accuracy | EER | AUC |', '|---|---|---|---|---|']
    for name, by_row in record['sets'].items():
        for key, label in record['rows'].items():
            r = by_row[key]
            lines.append(f"| {name} | {label} | {r['accuracy']:.4f} | {r['eer']:.4f} | "
                         f"{r['auc']:.4f} |")
    return '\n'.join(lines)


def write_report(results, out_dir, prefix):
    """Write `<prefix>_results.json` and a ROC + histogram PNG per verification set."""
    summary = {name: _json_metrics(metrics) for name, metrics in results.items()}
    json_path = os.path.join(out_dir, f'{prefix}_results.json')
    with atomic_output(json_path, 'w') as fh:
        json.dump(summary, fh, indent=2, sort_keys=True)
    paths = [json_path]
    for name, metrics in results.items():
        if 'distances' in metrics and 'fpr' in metrics:
            png = os.path.join(out_dir, f'{prefix}_{name}.png')
            _plot_set(name, metrics, png)
            paths.append(png)
    return paths


__all__ = ['MEASURES', 'pair_distances', 'distance_matrix', 'kfold_ids',
           'default_thresholds', 'roc_curve', 'equal_error_rate', 'verification_metrics',
           'retrieval_metrics', 'central_crop', 'extract_embeddings', 'evaluate_verification',
           'evaluate_retrieval', 'evaluate_pairs', 'format_table', 'format_retrieval_table',
           'write_report', 'results_dir', 'write_reports', 'comparison_record',
           'format_comparison']
