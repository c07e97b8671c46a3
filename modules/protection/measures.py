"""Evidence for template protection: unlinkability and revocability of IoM codes.

Unlinkability follows M. Gomez-Barrero, J. Galbally, C. Rathgeb and C. Busch, "General framework to
evaluate unlinkability in biometric template protection systems", IEEE TIFS 13(6), 2018. Two
templates of the same subject issued under different keys (mated, H_m) should not be told apart
from templates of different subjects under different keys (non-mated, H_nm) by their similarity
score s.
"""
import os

import numpy as np

from modules.utils import UserError, atomic_path

DEFAULT_BINS = 100
DEFAULT_MAX_PAIRS = 200_000


def _scores_1d(values, what):
    arr = np.asarray(values, np.float64).ravel()
    if arr.size == 0:
        raise UserError(f'{what}: no scores given')
    if not np.isfinite(arr).all():
        raise UserError(f'{what}: scores contain NaN or infinite values')
    return arr


def _common_edges(mated, nonmated, bins):
    """(edges, centres) of the bins shared by both score sets."""
    if np.ndim(bins) != 0:
        edges = np.asarray(bins, np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise UserError('unlinkability: bin edges must be a strictly increasing 1-D sequence')
        return edges, 0.5 * (edges[:-1] + edges[1:])
    if isinstance(bins, bool) or int(bins) != bins or bins < 1:
        raise UserError(f'unlinkability: bins must be a positive integer or edges, got {bins!r}')
    values = np.unique(np.concatenate([mated, nonmated]))
    if values.size == 1:
        return np.array([values[0] - 0.5, values[0] + 0.5]), values
    if values.size <= bins:
        # Discrete scores (code similarities are multiples of 1/m): one bin per value, centred on
        # it, so that equal-width bins cannot alias against the score lattice.
        return _edges_around(values), values
    edges = np.linspace(values[0], values[-1], int(bins) + 1)
    return edges, 0.5 * (edges[:-1] + edges[1:])


def _edges_around(centres):
    """Edges midway between sorted centres, the outer ones half a neighbouring gap outside."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    half = np.diff(centres) / 2
    return np.r_[centres[0] - half[0], centres[:-1] + half, centres[-1] + half[-1]]


def unlinkability(mated_scores, nonmated_scores, bins=DEFAULT_BINS, omega=1.0):
    """Local and global unlinkability (Gomez-Barrero et al. 2018): returns (s, d_local, d_sys).

    The score densities p(s|H_m) and p(s|H_nm) are estimated by histograms over common bins
    (`bins`: explicit bin edges, or a number of equal-width bins spanning both score sets; when the
    scores take at most that many distinct values, one bin per value instead). With
    LR(s) = p(s|H_m) / p(s|H_nm) and omega = p(H_m) / p(H_nm) (1 by default: no prior knowledge),

        D(s) = 2 * LR(s) * omega / (1 + LR(s) * omega) - 1   where LR(s) * omega > 1, else 0,

    i.e. D(s) = p(H_m|s) - p(H_nm|s) clipped at 0, and

        D_sys = integral of p(s|H_m) * D(s) ds = sum over bins of P(bin|H_m) * D(bin).

    D(s) is written as (omega*p_m - p_nm) / (omega*p_m + p_nm), which equals the form above and
    is 1 where p_nm = 0 < p_m (LR infinite); bins where both densities vanish get D = 0 (they carry
    no mated mass). D_sys is 0 for fully unlinkable and 1 for fully linkable templates. `s` holds
    the bin centres (the values themselves for discrete scores), `d_local` D(s) per bin.
    """
    mated = _scores_1d(mated_scores, 'mated_scores')
    nonmated = _scores_1d(nonmated_scores, 'nonmated_scores')
    if not omega > 0:
        raise UserError(f'unlinkability: omega must be positive, got {omega!r}')
    edges, s = _common_edges(mated, nonmated, bins)
    # Mass per bin; the bin width cancels in LR and in the D_sys sum, so masses suffice.
    p_m = np.histogram(mated, edges)[0] / mated.size
    p_nm = np.histogram(nonmated, edges)[0] / nonmated.size
    num = omega * p_m - p_nm
    den = omega * p_m + p_nm
    d_local = np.where(num > 0, num / np.where(den > 0, den, 1.0), 0.0)
    d_sys = float(np.sum(p_m * d_local))
    return s, d_local, d_sys


# ---------------------------------------------------------------------------------------------
# Scores on codes
def _codes_2d(codes, what):
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise UserError(f'{what} must be a 2-D array (items, m), got shape {arr.shape}')
    if arr.dtype.kind not in 'biu':
        raise UserError(f'{what} must hold integer IoM codes, got dtype {arr.dtype}')
    return arr


def _check_same_shape(a, b, what_a, what_b):
    if a.shape != b.shape:
        raise UserError(f'{what_a} has shape {a.shape} but {what_b} has shape {b.shape}; '
                        'row i of both must be the same sample')


def similarity_scores(codes_a, codes_b):
    """Row-wise similarity of two (N, m) code arrays: fraction of positions with equal indices."""
    a = _codes_2d(codes_a, 'codes_a')
    b = _codes_2d(codes_b, 'codes_b')
    _check_same_shape(a, b, 'codes_a', 'codes_b')
    return np.count_nonzero(a == b, axis=1) / a.shape[1]


def _labels_for(labels, n):
    arr = np.asarray(labels).ravel()
    if arr.size != n:
        raise UserError(f'{arr.size} labels for {n} codes')
    return arr


def same_subject_pairs(labels, same_sample=False):
    """All ordered pairs (i, j) with labels[i] == labels[j] (i != j unless same_sample): (i, j)."""
    labels = np.asarray(labels).ravel()
    order = np.argsort(labels, kind='stable')
    _, start, size = np.unique(labels[order], return_index=True, return_counts=True)
    # Position p of the sorted labels pairs with every position of its own group.
    group_size = np.repeat(size, size)
    group_start = np.repeat(start, size)
    left = np.repeat(np.arange(labels.size), group_size)
    offset = np.arange(left.size) - np.repeat(np.cumsum(group_size) - group_size, group_size)
    right = np.repeat(group_start, group_size) + offset
    i, j = order[left], order[right]
    if not same_sample:
        keep = i != j
        i, j = i[keep], j[keep]
    return i, j


def different_subject_pairs(labels, max_pairs=DEFAULT_MAX_PAIRS, seed=0):
    """Ordered pairs (i, j) with labels[i] != labels[j], at most `max_pairs` of them: (i, j).

    Small sets are enumerated (a seeded subset without replacement if there are too many).
    Large sets are sampled with replacement: i uniformly, then j uniformly among the samples of
    the other subjects, which needs no rejection loop however unbalanced the subjects are.
    """
    labels = np.asarray(labels).ravel()
    n = labels.size
    rng = np.random.default_rng(seed)
    if n * n <= 4 * max_pairs:
        i, j = np.divmod(np.arange(n * n), n)
        keep = labels[i] != labels[j]
        i, j = i[keep], j[keep]
        if i.size > max_pairs:
            pick = np.sort(rng.choice(i.size, max_pairs, replace=False))
            i, j = i[pick], j[pick]
        return i, j
    order = np.argsort(labels, kind='stable')
    _, inverse, start, size = _groups(labels[order])
    group_start = np.empty(n, np.int64)
    group_size = np.empty(n, np.int64)
    group_start[order], group_size[order] = start[inverse], size[inverse]
    i = rng.integers(0, n, size=max_pairs)
    others = n - group_size[i]
    valid = others > 0
    if not valid.any():
        return np.empty(0, np.int64), np.empty(0, np.int64)
    i, others = i[valid], others[valid]
    # A position among the other subjects' samples in label order, skipping i's own block.
    r = rng.integers(0, others)
    r = np.where(r < group_start[i], r, r + group_size[i])
    return i, order[r]


def _groups(sorted_labels):
    """(unique, inverse, start, size) of an already sorted label array."""
    uniq, start, inverse, size = np.unique(sorted_labels, return_index=True, return_inverse=True,
                                           return_counts=True)
    return uniq, inverse, start, size


def mated_nonmated_scores(codes_key1, codes_key2, labels, max_pairs=DEFAULT_MAX_PAIRS, seed=0,
                          same_sample=False):
    """Cross-key similarity scores for unlinkability: (mated, nonmated) 1-D float arrays.

    Row i of `codes_key1` and `codes_key2` is the same sample hashed under two different keys and
    `labels[i]` its subject. Mated: template i under key 1 against template j under key 2 of the
    same subject (j != i unless `same_sample`, which also admits the same sample re-hashed).
    Non-mated: i and j of different subjects, again across the keys. Each set holds at most
    `max_pairs` scores (a seeded random subset when there are more; see
    `different_subject_pairs`). Mated pairs are enumerated per subject before subsampling.
    """
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer)) \
            or max_pairs < 1:
        raise UserError(f'max_pairs must be a positive integer, got {max_pairs!r}')
    a = _codes_2d(codes_key1, 'codes_key1')
    b = _codes_2d(codes_key2, 'codes_key2')
    _check_same_shape(a, b, 'codes_key1', 'codes_key2')
    labels = _labels_for(labels, a.shape[0])
    mi, mj = same_subject_pairs(labels, same_sample)
    if mi.size == 0:
        raise UserError('no mated pairs: every subject has a single sample '
                        '(pass same_sample=True to compare a sample with itself across keys)')
    rng = np.random.default_rng(seed)
    if mi.size > max_pairs:
        pick = np.sort(rng.choice(mi.size, max_pairs, replace=False))
        mi, mj = mi[pick], mj[pick]
    ni, nj = different_subject_pairs(labels, max_pairs, seed + 1)
    if ni.size == 0:
        raise UserError('no non-mated pairs: all codes belong to one subject')
    return similarity_scores(a[mi], b[mj]), similarity_scores(a[ni], b[nj])


def revocability_rate(enrol_codes_k1, probe_codes_k2, labels, threshold, same_sample=True):
    """Fraction of same-subject cross-key comparisons that would still be accepted.

    Enrolment template i (old key) is compared with probe template j (new key) for every pair of
    the same subject (`same_sample`: j == i, the same capture re-hashed, is included). Hamming
    distance = number of differing indices (0..m), and a comparison is accepted when
    distance < threshold: strictly below, the rule modules.evaluations.verification_metrics uses
    for its threshold. 0 means an old template is useless against the re-issued one.
    """
    a = _codes_2d(enrol_codes_k1, 'enrol_codes_k1')
    b = _codes_2d(probe_codes_k2, 'probe_codes_k2')
    _check_same_shape(a, b, 'enrol_codes_k1', 'probe_codes_k2')
    labels = _labels_for(labels, a.shape[0])
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise UserError(f'revocability_rate: threshold must be finite, got {threshold}')
    i, j = same_subject_pairs(labels, same_sample)
    if i.size == 0:
        raise UserError('revocability_rate: no same-subject comparisons')
    hamming = np.count_nonzero(a[i] != b[j], axis=1)
    return float(np.mean(hamming < threshold))


# ---------------------------------------------------------------------------------------------
# Verification-set protocol (pair i = images 2i and 2i+1)
def _issame(issame, n_codes):
    same = np.asarray(issame).ravel()
    if same.dtype != np.bool_:
        if not np.isin(same, (0, 1)).all():
            raise UserError('issame must hold booleans')
        same = same.astype(bool)
    if 2 * same.size != n_codes:
        raise UserError(f'{same.size} pairs need {2 * same.size} codes, got {n_codes}')
    return same


def pair_labels(issame):
    """Subject labels for a verification set's 2N images that say only what the pairs say.

    The two images of a genuine pair share a label; every other image gets a label of its own (the
    pairs do not tell whether images of different pairs show the same person).
    """
    same = np.asarray(issame, bool).ravel()
    n = same.size
    labels = np.arange(2 * n) + n
    labels[0::2] = np.where(same, np.arange(n), labels[0::2])
    labels[1::2] = np.where(same, np.arange(n), labels[1::2])
    return labels


def cross_key_pair_scores(codes_key1, codes_key2, issame, same_sample=False):
    """(mated, nonmated) cross-key similarity scores over a verification set's pairs.

    Image 2i (key 1) is compared with image 2i+1 (key 2) and image 2i+1 (key 1) with image 2i
    (key 2): genuine pairs give the mated scores, impostor pairs the non-mated ones, so no pair of
    unknown relation is used. With `same_sample` the mated scores are instead every image against
    itself re-hashed under the other key.
    """
    a = _codes_2d(codes_key1, 'codes_key1')
    b = _codes_2d(codes_key2, 'codes_key2')
    _check_same_shape(a, b, 'codes_key1', 'codes_key2')
    same = _issame(issame, a.shape[0])
    forward = similarity_scores(a[0::2], b[1::2])
    backward = similarity_scores(a[1::2], b[0::2])
    nonmated = np.r_[forward[~same], backward[~same]]
    if same_sample:
        mated = similarity_scores(a, b)
    else:
        mated = np.r_[forward[same], backward[same]]
    if mated.size == 0 or nonmated.size == 0:
        raise UserError('the verification set needs both genuine and impostor pairs')
    return mated, nonmated


def evaluate_protection(codes_by_key, plain_codes, issame, bins=DEFAULT_BINS):
    """Unlinkability, revocability and verification of a verification set's codes under keys.

    `codes_by_key`: list of (2N, m) codes, the same images hashed under different keys;
    `plain_codes`: the same images hashed without permutation. Verification (Hamming distance,
    modules.evaluations.verification_metrics) is measured per key with one shared key for both
    images of a pair; its threshold under the first key is the operating point of the
    revocability rates. Cross-key numbers pool every ordered pair of distinct keys.
    """
    from modules import evaluations as ev

    if len(codes_by_key) < 2:
        raise UserError('evaluate_protection needs codes under at least two keys')
    codes = [_codes_2d(c, f'codes_by_key[{i}]') for i, c in enumerate(codes_by_key)]
    plain = _codes_2d(plain_codes, 'plain_codes')
    for i, c in enumerate(codes):
        _check_same_shape(c, plain, f'codes_by_key[{i}]', 'plain_codes')
    same = _issame(issame, plain.shape[0])
    m = plain.shape[1]

    def verify(c):
        dist = ev.pair_distances(c[0::2], c[1::2], 'Hamming')
        met = ev.verification_metrics(dist, same)
        return {'accuracy': met['accuracy'], 'eer': met['eer'], 'auc': met['auc'],
                'threshold': met['threshold']}, dist

    per_key = [verify(c) for c in codes]
    plain_metrics, _ = verify(plain)
    threshold = per_key[0][0]['threshold']
    dist0 = per_key[0][1]
    labels = pair_labels(same)
    key_pairs = [(a, b) for a in range(len(codes)) for b in range(len(codes)) if a != b]
    mated, nonmated, mated_self, revoc_pairs, revoc_self = [], [], [], [], []
    for a, b in key_pairs:
        mt, nm = cross_key_pair_scores(codes[a], codes[b], same)
        mated.append(mt)
        nonmated.append(nm)
        mated_self.append(similarity_scores(codes[a], codes[b]))
        revoc_pairs.append(revocability_rate(codes[a], codes[b], labels, threshold,
                                             same_sample=False))
        revoc_self.append(revocability_rate(codes[a], codes[b], np.arange(labels.size),
                                            threshold, same_sample=True))
    mated, nonmated, mated_self = map(np.concatenate, (mated, nonmated, mated_self))
    s, d_local, d_sys = unlinkability(mated, nonmated, bins)
    _, _, d_sys_self = unlinkability(mated_self, nonmated, bins)
    eers = [met['eer'] for met, _ in per_key]
    return {
        'num_keys': len(codes), 'num_pairs': int(same.size), 'm': int(m),
        'num_genuine_pairs': int(same.sum()),
        'd_sys': d_sys, 'd_sys_same_sample': d_sys_self,
        'num_mated': int(mated.size), 'num_nonmated': int(nonmated.size),
        'mated_mean': float(mated.mean()), 'nonmated_mean': float(nonmated.mean()),
        'threshold': threshold,
        'accept_rule': 'Hamming distance < threshold',
        # Same-key operating point, for scale: genuine / impostor pairs accepted under key 0.
        'tar_same_key': float(np.mean(dist0[same] < threshold)),
        'far_same_key': float(np.mean(dist0[~same] < threshold)),
        'revocability_rate': float(np.mean(revoc_pairs)),
        'revocability_rate_same_sample': float(np.mean(revoc_self)),
        'verification_per_key': [met for met, _ in per_key],
        'eer_shared_key': eers[0],
        'eer_shared_key_mean': float(np.mean(eers)),
        'eer_shared_key_std': float(np.std(eers)),
        'verification_plain': plain_metrics,
        'eer_plain': plain_metrics['eer'],
        # Arrays for plot_unlinkability (not written to JSON by the CLI).
        'scores': {'mated': mated, 'nonmated': nonmated, 's': s, 'd_local': d_local},
    }


def like_real_embeddings(embeddings, n, seed=0):
    """n random embeddings drawn like real ones: the norm of a random real one, a random direction."""
    emb = np.asarray(embeddings, np.float64)
    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(emb, axis=1)[rng.integers(0, len(emb), n)]
    direction = rng.standard_normal((n, emb.shape[1]))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return (direction * norms[:, None]).astype(np.float32)


def zero_effort_rate(random_codes, enrolled_codes, threshold, chunk=256):
    """Fraction of (random probe, enrolled template) comparisons accepted: Hamming < threshold."""
    a = _codes_2d(random_codes, 'random_codes')
    b = _codes_2d(enrolled_codes, 'enrolled_codes')
    if a.shape[1] != b.shape[1]:
        raise UserError(f'random codes have m={a.shape[1]}, enrolled codes m={b.shape[1]}')
    from modules.evaluations import distance_matrix
    accepted = sum(int(np.count_nonzero(distance_matrix(a[i:i + chunk], b, 'Hamming') < threshold))
                   for i in range(0, len(a), chunk))
    return accepted / (len(a) * len(b))


# Non-mated agreement across keys above (1 + this) / q: a key-independent component in the codes.
MAX_EXCESS_AGREEMENT = 0.1


def key_change_verdict(report, max_revocability=0.01, q=None):
    """(ok, reasons, tolerance): do codes under new keys verify as well as without one, and revoke?

    The EER under the random keys may exceed the EER without a key by at most twice the
    binomial standard error of an EER measured on the set's pairs, sqrt(e (1 - e) / n) with n
    the smaller of the genuine and impostor pair counts (the spread of the figure from one run
    to another); the revocability rates must not exceed `max_revocability`; with `q` given,
    unrelated faces under different keys may agree on at most (1 + MAX_EXCESS_AGREEMENT) / q of
    the positions (chance is 1/q).
    """
    eer = report['eer_plain']
    pairs = min(report['num_genuine_pairs'], report['num_pairs'] - report['num_genuine_pairs'])
    tolerance = 2 * float(np.sqrt(max(eer * (1 - eer), 1e-12) / pairs))
    gap = report['eer_shared_key_mean'] - eer
    revocability = max(report['revocability_rate'], report['revocability_rate_same_sample'])
    reasons = []
    if gap > tolerance:
        reasons.append(f'EER under new keys {report["eer_shared_key_mean"]:.4f} is worse than '
                       f'without a key {eer:.4f} by {gap:.4f} (> {tolerance:.4f}, twice its '
                       'standard error)')
    if revocability > max_revocability:
        reasons.append(f'revocability rate {revocability:.4f} > {max_revocability}: codes of a '
                       'revoked key are still accepted under the new one')
    if q and report['nonmated_mean'] > (1 + MAX_EXCESS_AGREEMENT) / q:
        reasons.append(f"unrelated faces under different keys agree on {report['nonmated_mean']:.4f} "
                       f'of positions, chance is 1/q = {1 / q:.4f}: part of the code does not '
                       'depend on the key')
    return not reasons, reasons, tolerance


# ---------------------------------------------------------------------------------------------
def plot_unlinkability(mated, nonmated, s, d_local, d_sys, path, bins=None):
    """Save score histograms of both hypotheses with D(s) on a twin axis (D_sys in the title)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    mated = _scores_1d(mated, 'mated')
    nonmated = _scores_1d(nonmated, 'nonmated')
    s = np.asarray(s, np.float64)
    d_local = np.asarray(d_local, np.float64)
    if s.shape != d_local.shape or s.ndim != 1:
        raise UserError('plot_unlinkability: s and d_local must be 1-D arrays of the same length')
    # Without explicit edges, rebuild those `unlinkability` used (exact for its default bins).
    bins = _edges_around(s) if bins is None else np.asarray(bins, np.float64)
    # D(s) is drawn only where some score fell, so empty bins do not show as drops to zero.
    seen = (np.histogram(mated, bins)[0] + np.histogram(nonmated, bins)[0]) > 0
    d_shown = np.where(seen, d_local, np.nan) if seen.size == d_local.size else d_local
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        ax.hist(nonmated, bins=bins, density=True, alpha=0.5, color='tab:red',
                label=f'non-mated (n={nonmated.size})')
        ax.hist(mated, bins=bins, density=True, alpha=0.5, color='tab:green',
                label=f'mated (n={mated.size})')
        ax.set_xlabel('score s (fraction of equal indices)')
        ax.set_ylabel('probability density')
        twin = ax.twinx()
        twin.plot(s, d_shown, color='black', linewidth=1.5, label='D(s)')
        twin.set_ylim(-0.05, 1.05)
        twin.set_ylabel('local linkability D(s)')
        handles = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], loc='upper left', fontsize='small')
        ax.set_title(f'Unlinkability: D_sys = {d_sys:.4f}')
        fig.tight_layout()
        fmt = os.path.splitext(path)[1].lstrip('.').lower() or 'png'
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    finally:
        plt.close(fig)
    return path
