"""Training losses: softmax cross-entropy (stage 1) and the IoM hashing losses (stage 2).

Stage-2 inputs: `labels` (batch,) int identities, `codes` (batch, m) float soft indices in [0, q-1]
(IoMHead in training mode), `probs` (batch, m, q) soft assignments (IoMHead.probabilities).
Every loss is batch-vectorised (pairwise matrices or (a, p, n) tensors, no Python loops) and returns
a float32 scalar. Pairs and triplets follow the usual conventions: a positive of anchor a is another
sample (p != a) with the same label, a negative any sample with a different label. Anchors without
a positive or without a negative in the batch take no part; a batch with no usable anchor gives 0.
"""
import math

import numpy as np
import tensorflow as tf

from modules.config import setting
from modules.layers import expected_index
from modules.utils import UserError

_ACOS_EPS = 1e-6  # keeps d acos / d cos = -1/sqrt(1 - c^2) finite for (near-)duplicate codes


# ---------------------------------------------------------------------------------------------
def softmax_loss(labels, logits):
    """Stage 1: mean over the batch of -log softmax(logits)[label] (sparse cross-entropy)."""
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels,
                                                        logits=tf.cast(logits, tf.float32))
    return tf.reduce_mean(ce)


# ---------------------------------------------------------------------------------------------
def _pair_masks(labels):
    """(positive, negative) boolean (batch, batch) masks; the diagonal is in neither."""
    labels = tf.reshape(labels, [-1])
    same = tf.equal(labels[:, None], labels[None, :])
    eye = tf.eye(tf.shape(labels)[0], dtype=tf.bool)
    return tf.logical_and(same, tf.logical_not(eye)), tf.logical_not(same)


def _masked_mean(values, mask):
    """Mean of `values` where `mask` holds; 0 when it holds nowhere."""
    mask = tf.cast(mask, values.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(values * mask), tf.reduce_sum(mask))


def pairwise_distances(codes):
    """Euclidean distances (batch, batch) between rows, with a finite gradient at distance 0.

    d_ij^2 = |x_i|^2 - 2 x_i.x_j + |x_j|^2 on batch-centred rows (distances do not change, the
    cancellation error does), clipped at 0, diagonal exactly 0; sqrt is only taken where d^2 > 0.
    """
    x = tf.cast(codes, tf.float32)
    x = x - tf.stop_gradient(tf.reduce_mean(x, axis=0, keepdims=True))
    sq = tf.reduce_sum(tf.square(x), axis=1)
    d2 = sq[:, None] - 2.0 * tf.matmul(x, x, transpose_b=True) + sq[None, :]
    d2 = tf.maximum(d2, 0.0) * (1.0 - tf.eye(tf.shape(x)[0]))
    zero = d2 <= 0.0
    return tf.where(zero, 0.0, tf.sqrt(tf.where(zero, 1.0, d2)))


def pairwise_angles(codes):
    """Angles (batch, batch) in [0, pi] between the L2-normalised rows, acos clipped for safety."""
    x = tf.math.l2_normalize(tf.cast(codes, tf.float32), axis=1)
    cos = tf.matmul(x, x, transpose_b=True)
    return tf.acos(tf.clip_by_value(cos, -1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))


def _hardest(values, pos, neg):
    """Per anchor: largest value over its positives, smallest over its negatives, valid mask."""
    big = tf.stop_gradient(tf.reduce_max(values)) + 1.0
    hardest_pos = tf.reduce_max(tf.where(pos, values, 0.0), axis=1)
    hardest_neg = tf.reduce_min(tf.where(neg, values, big), axis=1)
    valid = tf.logical_and(tf.reduce_any(pos, axis=1), tf.reduce_any(neg, axis=1))
    return hardest_pos, hardest_neg, valid


# ---------------------------------------------------------------------------------------------
def batch_hard_triplet(labels, codes, margin=0.0):
    """Batch-hard triplet loss on Euclidean distances d between codes.

    L = mean over anchors a of relu(max_{p in P(a)} d_ap - min_{n in N(a)} d_an + margin).
    """
    pos, neg = _pair_masks(labels)
    hp, hn, valid = _hardest(pairwise_distances(codes), pos, neg)
    return _masked_mean(tf.nn.relu(hp - hn + margin), valid)


def batch_all_triplet_loss(labels, codes, margin=0.0):
    """Batch-all triplet loss: mean of relu(d_ap - d_an + margin) over the valid triplets
    (a, p, n) whose loss is positive (the triplets already satisfied do not dilute the mean)."""
    pos, neg = _pair_masks(labels)
    d = pairwise_distances(codes)
    valid = tf.logical_and(pos[:, :, None], neg[:, None, :])
    loss = tf.nn.relu(d[:, :, None] - d[:, None, :] + margin)
    loss = tf.where(valid, loss, 0.0)
    n_active = tf.reduce_sum(tf.cast(loss > 1e-16, tf.float32))
    return tf.math.divide_no_nan(tf.reduce_sum(loss), n_active)


def semihard_triplet_loss(labels, codes, margin=0.0):
    """FaceNet semi-hard triplet loss on Euclidean distances between codes.

    For each positive pair (a, p) the negative is the closest n with d_an > d_ap (semi-hard); when
    there is none, the farthest negative of a. L = mean over positive pairs of
    relu(d_ap - d_an(a, p) + margin). (Same mining rule as tf.contrib / TF-Addons
    triplet_semihard_loss with Euclidean distances.)
    """
    pos, neg = _pair_masks(labels)
    d = pairwise_distances(codes)
    d_ap = d[:, :, None]
    d_an = d[:, None, :]
    outside = tf.logical_and(neg[:, None, :], d_an > d_ap)  # (a, p, n)
    big = tf.stop_gradient(tf.reduce_max(d)) + 1.0
    closest_outside = tf.reduce_min(tf.where(outside, d_an, big), axis=2)  # (a, p)
    farthest = tf.reduce_max(tf.where(neg, d, -1.0), axis=1)  # (a,)
    chosen = tf.where(tf.reduce_any(outside, axis=2), closest_outside, farthest[:, None])
    valid = tf.logical_and(pos, tf.reduce_any(neg, axis=1, keepdims=True))
    return _masked_mean(tf.nn.relu(d - chosen + margin), valid)


def _arc_negative_term(tn, margin):
    # e^{cos(tn+m)} / (e^{cos(tn+m)} + e^{sin tn}) written as a sigmoid so it cannot overflow.
    return tf.sigmoid(tf.cos(tn + margin) - tf.sin(tn))


def _arc_positive_term(tp, margin):
    # e^{sin(tp+m)} / (e^{sin(tp+m)} + e^{cos tp}) as a sigmoid.
    return tf.sigmoid(tf.sin(tp + margin) - tf.cos(tp))


def batch_hard_arc_triplet_loss(labels, codes, margin=0.0, scale=32.0):
    """Angular batch-hard loss on the angles t between L2-normalised codes.

    Per anchor, tp = largest positive angle, tn = smallest negative angle, and
    L_a = e^{cos(tn+m)}/(e^{cos(tn+m)} + e^{sin tn}) + e^{sin(tp+m)}/(e^{sin(tp+m)} + e^{cos tp});
    L = scale * mean_a L_a. The first term falls as the negative moves away, the second as the
    positive comes closer; the margin m makes both stricter.
    """
    pos, neg = _pair_masks(labels)
    tp, tn, valid = _hardest(pairwise_angles(codes), pos, neg)
    per_anchor = _arc_negative_term(tn, margin) + _arc_positive_term(tp, margin)
    return scale * _masked_mean(per_anchor, valid)


def batch_all_arc_triplet_loss(labels, codes, margin=0.0, scale=32.0):
    """Angular batch-all loss: the batch-hard summand averaged over every (positive, negative)
    combination of an anchor, then over anchors, times scale.

    The summand is f_neg(t_an) + f_pos(t_ap), so its mean over the pairs (p, n) of anchor a is
    mean_p f_pos(t_ap) + mean_n f_neg(t_an): computed that way, O(batch^2) instead of batch^3.
    """
    pos, neg = _pair_masks(labels)
    t = pairwise_angles(codes)
    posf, negf = tf.cast(pos, tf.float32), tf.cast(neg, tf.float32)
    pos_mean = tf.math.divide_no_nan(tf.reduce_sum(_arc_positive_term(t, margin) * posf, 1),
                                     tf.reduce_sum(posf, 1))
    neg_mean = tf.math.divide_no_nan(tf.reduce_sum(_arc_negative_term(t, margin) * negf, 1),
                                     tf.reduce_sum(negf, 1))
    valid = tf.logical_and(tf.reduce_any(pos, axis=1), tf.reduce_any(neg, axis=1))
    return scale * _masked_mean(pos_mean + neg_mean, valid)


METRIC_LOSSES = {
    'batch_hard_triplet': batch_hard_triplet,
    'batch_all_triplet_loss': batch_all_triplet_loss,
    'semihard_triplet_loss': semihard_triplet_loss,
    'batch_all_arc_triplet_loss': batch_all_arc_triplet_loss,
    'batch_hard_arc_triplet_loss': batch_hard_arc_triplet_loss,
}
ARC_LOSSES = ('batch_all_arc_triplet_loss', 'batch_hard_arc_triplet_loss')


# ---------------------------------------------------------------------------------------------
def quantization_loss(codes):
    """mean (s - round(s))^2 over batch and positions; the rounding is not differentiated."""
    codes = tf.cast(codes, tf.float32)
    return tf.reduce_mean(tf.square(codes - tf.stop_gradient(tf.round(codes))))


def code_balance_loss(probs):
    """Balance of the index values over the batch, from the soft assignments (so it has a gradient).

    With pbar_{m,j} = mean_b p_{b,m,j} and sbar_m = mean_b sum_j j p_{b,m,j}:
      usage  = q/(q-1) * mean_m sum_j (pbar_{m,j} - 1/q)^2   (0: every value used equally, 1: one
               value only)
      centre = mean_m (sbar_m - (q-1)/2)^2 / q^2              (code means centred on (q-1)/2)
      L = usage + centre.
    """
    probs = tf.cast(probs, tf.float32)
    q = int(probs.shape[-1])
    pbar = tf.reduce_mean(probs, axis=0)
    usage = tf.reduce_mean(tf.reduce_sum(tf.square(pbar - 1.0 / q), axis=-1)) * q / max(q - 1, 1)
    sbar = tf.reduce_mean(expected_index(probs), axis=0)
    centre = tf.reduce_mean(tf.square(sbar - (q - 1) / 2.0)) / float(q * q)
    return usage + centre


BIN_LUT_KINDS = ('tanh', 'sigmoid', 'none')


def _bits_of_indices(q):
    """(q, log2 q) float32 table: row j holds the binary digits of j, least significant first."""
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 2 or q & (q - 1):
        raise UserError(f"bin_lut_loss needs q to be a power of 2 (2, 4, 8, ...), got q={q!r}; "
                        "set bin_lut_loss: 'none' or change q")
    n_bits = int(math.log2(q))
    return ((np.arange(q)[:, None] >> np.arange(n_bits)[None, :]) & 1).astype(np.float32)


def bin_lut_loss(assign, q, kind='tanh'):
    """Relaxed binarisation of each index into its log2(q)-bit LUT code.

    `assign` is probs (batch, m, q) or soft codes (batch, m); codes are turned into assignments by
    linear interpolation between the two nearest integers, p_j = relu(1 - |s - j|). The soft bit
    k of a position is its expected value b_k = sum_j p_j bit_k(j), pushed towards 0 or 1:
      'sigmoid': L = mean b (1 - b)          (in [0, 1/4], smooth)
      'tanh':    L = mean (1 - |2b - 1|)     (t = 2b - 1 in [-1, 1]; in [0, 1], constant pull; the
                                              smooth 1 - t^2 would only be 4x the sigmoid form)
      'none':    L = 0.
    q must be a power of 2.
    """
    if kind not in BIN_LUT_KINDS:
        raise UserError(f"bin_lut_loss is {kind!r}; allowed: " + ', '.join(BIN_LUT_KINDS))
    bits = _bits_of_indices(q)
    if kind == 'none':
        return tf.constant(0.0, tf.float32)
    assign = tf.cast(assign, tf.float32)
    if assign.shape.rank == 2:
        assign = tf.nn.relu(1.0 - tf.abs(assign[..., None] - tf.range(q, dtype=tf.float32)))
    elif assign.shape.rank != 3 or assign.shape[-1] != q:
        raise ValueError(f'bin_lut_loss: expected (batch, m, {q}) probabilities or (batch, m) '
                         f'codes, got shape {assign.shape}')
    b = tf.tensordot(assign, tf.constant(bits), axes=[[2], [0]])  # (batch, m, log2 q)
    if kind == 'sigmoid':
        return tf.reduce_mean(b * (1.0 - b))
    return tf.reduce_mean(1.0 - tf.abs(2.0 * b - 1.0))


# ---------------------------------------------------------------------------------------------
class IoMLoss:
    """Stage-2 total loss from a config.

    total = metric_weight * metric(loss_fun, triplet_margin) + l2_weight * L2
            + quanti_weight * quanti            (if cfg['quanti'])
            + bin_lut_weight * bin_lut          (kind cfg['bin_lut_loss']; 'none' is 0)
            + code_balance_weight * code_balance (if cfg['code_balance_loss']).
    The arc losses use `arc_scale` (32, as the original training did).
    """

    TERMS = ('metric', 'l2', 'quanti', 'bin_lut', 'code_balance')

    def __init__(self, cfg, arc_scale=32.0):
        # cfg is validated (loss_fun and bin_lut_loss among their choices); partial configs get
        # the SCHEMA defaults.
        self.loss_fun = setting(cfg, 'loss_fun')
        self.metric_fn = METRIC_LOSSES[self.loss_fun]
        self.margin = float(setting(cfg, 'triplet_margin'))
        self.arc_scale = float(arc_scale)
        self.use_quanti = bool(setting(cfg, 'quanti'))
        self.use_code_balance = bool(setting(cfg, 'code_balance_loss'))
        self.bin_lut_kind = setting(cfg, 'bin_lut_loss')
        self.q = setting(cfg, 'q')
        if self.bin_lut_kind != 'none':
            _bits_of_indices(self.q)  # a bad q fails at construction, not mid-training
        self.weights = {name: float(setting(cfg, f'{name}_weight')) for name in self.TERMS}

    def __call__(self, labels, codes, probs, l2=0.0):
        """Return (total, {term: unweighted value}) for one batch; disabled terms are 0."""
        zero = tf.constant(0.0, tf.float32)
        kwargs = {'scale': self.arc_scale} if self.loss_fun in ARC_LOSSES else {}
        terms = {
            'metric': self.metric_fn(labels, codes, margin=self.margin, **kwargs),
            'l2': tf.cast(l2, tf.float32),
            'quanti': quantization_loss(codes) if self.use_quanti else zero,
            'bin_lut': bin_lut_loss(probs, self.q, self.bin_lut_kind),
            'code_balance': code_balance_loss(probs) if self.use_code_balance else zero,
        }
        total = tf.add_n([self.weights[name] * terms[name] for name in self.TERMS])
        return total, terms
