"""Losses against straightforward numpy references (loops), gradients, and the total IoM loss."""
import math

import numpy as np
import pytest
import tensorflow as tf

from modules import losses
from modules.config import LOSS_FUNS
from modules.utils import UserError

RTOL, ATOL = 1e-4, 1e-5


def _batch(seed=0, singleton=False, duplicates=False, m=6, q=4):
    """4 identities x 3 samples (optionally one identity with a single sample), soft codes."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 3)
    if singleton:
        labels = np.append(labels, 9)
    labels = rng.permutation(labels)
    codes = rng.uniform(0, q - 1, size=(len(labels), m))
    if duplicates:
        same = np.flatnonzero(labels == labels[0])
        other = np.flatnonzero(labels != labels[0])
        codes[same[1]] = codes[same[0]]
        codes[other[0]] = codes[same[0]]
    return labels.astype(np.int32), codes.astype(np.float32)


# ---- numpy references ----------------------------------------------------------------------
def _dist(x):
    x = x.astype(np.float64)
    return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))


def _angles(x):
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.arccos(np.clip(x @ x.T, -1.0, 1.0))


def _pos_neg(labels, a):
    n = len(labels)
    pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
    neg = [k for k in range(n) if labels[k] != labels[a]]
    return pos, neg


def ref_batch_hard(labels, codes, margin):
    d, vals = _dist(codes), []
    for a in range(len(labels)):
        pos, neg = _pos_neg(labels, a)
        if pos and neg:
            vals.append(max(max(d[a, p] for p in pos) - min(d[a, k] for k in neg) + margin, 0.0))
    return np.mean(vals) if vals else 0.0


def ref_batch_all(labels, codes, margin):
    d, active = _dist(codes), []
    for a in range(len(labels)):
        pos, neg = _pos_neg(labels, a)
        for p in pos:
            for k in neg:
                v = d[a, p] - d[a, k] + margin
                if v > 1e-16:
                    active.append(v)
    return np.mean(active) if active else 0.0


def ref_semihard(labels, codes, margin):
    d, vals = _dist(codes), []
    for a in range(len(labels)):
        pos, neg = _pos_neg(labels, a)
        if not neg:
            continue
        for p in pos:
            outside = [d[a, k] for k in neg if d[a, k] > d[a, p]]
            chosen = min(outside) if outside else max(d[a, k] for k in neg)
            vals.append(max(d[a, p] - chosen + margin, 0.0))
    return np.mean(vals) if vals else 0.0


def _f_neg(tn, m):
    return math.exp(math.cos(tn + m)) / (math.exp(math.cos(tn + m)) + math.exp(math.sin(tn)))


def _f_pos(tp, m):
    return math.exp(math.sin(tp + m)) / (math.exp(math.sin(tp + m)) + math.exp(math.cos(tp)))


def ref_hard_arc(labels, codes, margin, scale):
    t, vals = _angles(codes), []
    for a in range(len(labels)):
        pos, neg = _pos_neg(labels, a)
        if pos and neg:
            tp, tn = max(t[a, p] for p in pos), min(t[a, k] for k in neg)
            vals.append(_f_neg(tn, margin) + _f_pos(tp, margin))
    return scale * np.mean(vals)


def ref_all_arc(labels, codes, margin, scale):
    t, vals = _angles(codes), []
    for a in range(len(labels)):
        pos, neg = _pos_neg(labels, a)
        if pos and neg:
            combos = [_f_neg(t[a, k], margin) + _f_pos(t[a, p], margin) for p in pos for k in neg]
            vals.append(np.mean(combos))
    return scale * np.mean(vals)


# ---- metric losses ---------------------------------------------------------------------------
def test_metric_loss_registry_matches_config_names():
    assert set(losses.METRIC_LOSSES) == set(LOSS_FUNS)
    assert len(losses.METRIC_LOSSES) == 5


@pytest.mark.parametrize('singleton', [False, True])
@pytest.mark.parametrize('margin', [0.0, 0.7])
@pytest.mark.parametrize('name,ref', [
    ('batch_hard_triplet', ref_batch_hard),
    ('batch_all_triplet_loss', ref_batch_all),
    ('semihard_triplet_loss', ref_semihard),
])
def test_euclidean_triplet_losses_match_reference(name, ref, margin, singleton):
    labels, codes = _batch(seed=1, singleton=singleton)
    got = float(losses.METRIC_LOSSES[name](labels, codes, margin=margin))
    want = ref(labels, codes, margin)
    assert want > 0  # the batch is random: every family has work to do
    assert got == pytest.approx(want, rel=RTOL, abs=ATOL)


@pytest.mark.parametrize('singleton', [False, True])
@pytest.mark.parametrize('margin', [0.0, 0.3])
@pytest.mark.parametrize('name,ref', [
    ('batch_hard_arc_triplet_loss', ref_hard_arc),
    ('batch_all_arc_triplet_loss', ref_all_arc),
])
def test_arc_triplet_losses_match_reference(name, ref, margin, singleton):
    labels, codes = _batch(seed=2, singleton=singleton)
    got = float(losses.METRIC_LOSSES[name](labels, codes, margin=margin, scale=32.0))
    want = ref(labels, codes, margin, 32.0)
    assert got == pytest.approx(want, rel=RTOL, abs=ATOL)
    half = float(losses.METRIC_LOSSES[name](labels, codes, margin=margin, scale=16.0))
    assert half == pytest.approx(got / 2, rel=1e-5)


def test_hard_triplet_zero_when_classes_are_separated():
    labels = np.repeat(np.arange(3), 2).astype(np.int32)
    codes = np.repeat(np.eye(3, 4) * 10.0, 2, axis=0).astype(np.float32)  # each class one point
    assert float(losses.batch_hard_triplet(labels, codes, margin=1.0)) == 0.0
    assert float(losses.batch_all_triplet_loss(labels, codes, margin=1.0)) == 0.0
    assert float(losses.semihard_triplet_loss(labels, codes, margin=1.0)) == 0.0
    # With a margin larger than the class gap (sqrt 200) every triplet is active.
    assert float(losses.batch_hard_triplet(labels, codes, margin=20.0)) == pytest.approx(
        20.0 - math.sqrt(200.0), rel=1e-5)


def test_no_valid_anchor_gives_zero():
    labels = np.zeros(4, np.int32)  # a single identity: no negatives anywhere
    codes = np.random.default_rng(3).uniform(0, 3, (4, 5)).astype(np.float32)
    for fn in losses.METRIC_LOSSES.values():
        assert float(fn(labels, codes, margin=0.5)) == 0.0


@pytest.mark.parametrize('kind', ['random', 'duplicates', 'all_equal', 'all_zero'])
@pytest.mark.parametrize('name', sorted(losses.METRIC_LOSSES))
def test_metric_loss_gradients_are_finite(name, kind):
    labels, codes = _batch(seed=4, duplicates=(kind == 'duplicates'))
    if kind == 'all_equal':
        codes = np.full_like(codes, 1.5)
    elif kind == 'all_zero':
        codes = np.zeros_like(codes)
    x = tf.Variable(codes)
    with tf.GradientTape() as tape:
        loss = losses.METRIC_LOSSES[name](labels, x, margin=0.2)
    grad = tape.gradient(loss, x)
    assert np.isfinite(float(loss))
    assert grad is not None and np.isfinite(grad.numpy()).all()
    if kind == 'random':
        assert np.abs(grad.numpy()).max() > 0


@pytest.mark.parametrize('name,ref', [
    ('batch_hard_triplet', ref_batch_hard),
    ('batch_all_triplet_loss', ref_batch_all),
    ('batch_hard_arc_triplet_loss', lambda lab, c, m: ref_hard_arc(lab, c, m, 32.0)),
])
def test_metric_losses_with_duplicate_codes_match_reference(name, ref):
    labels, codes = _batch(seed=5, duplicates=True)
    got = float(losses.METRIC_LOSSES[name](labels, codes, margin=0.2))
    assert got == pytest.approx(ref(labels, codes, 0.2), rel=1e-3, abs=1e-3)


def test_pairwise_distances_exact_zero_on_duplicates():
    x = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    d = losses.pairwise_distances(x).numpy()
    np.testing.assert_allclose(d, _dist(x), rtol=1e-5, atol=1e-6)
    assert np.all(np.diag(d) == 0.0)


# ---- stage 1 ---------------------------------------------------------------------------------
def test_softmax_loss_matches_reference():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(5, 7)).astype(np.float32) * 4
    labels = np.array([0, 3, 6, 2, 3])
    ref = []
    for row, y in zip(logits.astype(np.float64), labels):
        ref.append(math.log(np.exp(row - row.max()).sum()) + row.max() - row[y])
    assert float(losses.softmax_loss(labels, logits)) == pytest.approx(np.mean(ref), rel=1e-5)


# ---- quantisation, code balance, LUT ---------------------------------------------------------
def test_quantization_loss():
    _, codes = _batch(seed=7)
    want = np.mean((codes.astype(np.float64) - np.round(codes)) ** 2)
    assert float(losses.quantization_loss(codes)) == pytest.approx(want, rel=1e-5)
    integer = np.array([[0.0, 3.0, 7.0], [1.0, 1.0, 2.0]], np.float32)
    assert float(losses.quantization_loss(integer)) == 0.0
    x = tf.Variable(codes)
    with tf.GradientTape() as tape:
        loss = losses.quantization_loss(x)
    grad = tape.gradient(loss, x).numpy()
    np.testing.assert_allclose(grad, 2 * (codes - np.round(codes)) / codes.size, rtol=1e-4,
                               atol=1e-7)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_code_balance(probs):
    batch, m, q = probs.shape
    usage = centre = 0.0
    for pos in range(m):
        pbar = [np.mean([probs[b, pos, j] for b in range(batch)]) for j in range(q)]
        usage += sum((p - 1.0 / q) ** 2 for p in pbar)
        sbar = np.mean([sum(j * probs[b, pos, j] for j in range(q)) for b in range(batch)])
        centre += (sbar - (q - 1) / 2) ** 2
    return usage / m * q / (q - 1) + centre / m / q ** 2


def test_code_balance_matches_reference_and_has_gradient():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(6, 5, 4)) * 2 + np.array([2.0, 0, 0, 0])  # value 0 favoured
    probs = _softmax(logits)
    got = float(losses.code_balance_loss(probs.astype(np.float32)))
    assert got == pytest.approx(ref_code_balance(probs), rel=1e-4)
    assert got > 0.05
    z = tf.Variable(logits.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.code_balance_loss(tf.nn.softmax(z, axis=-1))
    grad = tape.gradient(loss, z).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() > 1e-4


def test_code_balance_zero_when_balanced_one_when_collapsed():
    q, m = 4, 3
    # Batch of 8: at every position each value is used by exactly two samples (one-hot).
    idx = (np.arange(8)[:, None] + np.arange(m)[None, :]) % q
    onehot = np.eye(q, dtype=np.float32)[idx]
    assert float(losses.code_balance_loss(onehot)) == pytest.approx(0.0, abs=1e-7)
    uniform = np.full((5, m, q), 1.0 / q, np.float32)
    assert float(losses.code_balance_loss(uniform)) == pytest.approx(0.0, abs=1e-7)
    collapsed = np.eye(q, dtype=np.float32)[np.zeros((8, m), int)]
    # usage 1 and centre ((q-1)/2)^2 / q^2 = 9/64.
    assert float(losses.code_balance_loss(collapsed)) == pytest.approx(1 + 9 / 64, rel=1e-5)


def ref_bin_lut(probs, q, kind):
    batch, m, _ = probs.shape
    n_bits = int(math.log2(q))
    vals = []
    for b in range(batch):
        for pos in range(m):
            for k in range(n_bits):
                bit = sum(probs[b, pos, j] for j in range(q) if (j >> k) & 1)
                vals.append(bit * (1 - bit) if kind == 'sigmoid' else 1 - abs(2 * bit - 1))
    return np.mean(vals)


@pytest.mark.parametrize('kind', ['tanh', 'sigmoid'])
def test_bin_lut_matches_reference(kind):
    q = 8
    probs = _softmax(np.random.default_rng(9).normal(size=(3, 4, q)))
    got = float(losses.bin_lut_loss(probs.astype(np.float32), q, kind))
    assert got == pytest.approx(ref_bin_lut(probs, q, kind), rel=1e-4)
    assert got > 0
    # Hard assignments have exact bits: nothing to push.
    onehot = np.eye(q, dtype=np.float32)[np.random.default_rng(10).integers(0, q, (3, 4))]
    assert float(losses.bin_lut_loss(onehot, q, kind)) == pytest.approx(0.0, abs=1e-7)
    # Codes are interpolated between neighbouring integers: an integer code is exact, and the
    # code 2.5 (bits of 2 = 010 and 3 = 011 mixed) leaves only bit 0 undecided.
    assert float(losses.bin_lut_loss(np.array([[0.0, 5.0, 7.0]], np.float32), q, kind)) == 0.0
    half = float(losses.bin_lut_loss(np.array([[2.5]], np.float32), q, kind))
    assert half == pytest.approx((0.25 if kind == 'sigmoid' else 1.0) / 3, rel=1e-5)
    z = tf.Variable(np.random.default_rng(11).normal(size=(3, 4, q)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.bin_lut_loss(tf.nn.softmax(z), q, kind)
    grad = tape.gradient(loss, z).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_bin_lut_none_and_bad_q():
    probs = np.full((2, 3, 8), 1 / 8, np.float32)
    assert float(losses.bin_lut_loss(probs, 8, 'none')) == 0.0
    with pytest.raises(UserError, match='power of 2'):
        losses.bin_lut_loss(np.full((2, 3, 6), 1 / 6, np.float32), 6, 'tanh')
    with pytest.raises(UserError, match="bin_lut_loss is 'cube'"):
        losses.bin_lut_loss(probs, 8, 'cube')


# ---- total -----------------------------------------------------------------------------------
def _cfg(**over):
    # Weights left out come from the config schema's defaults.
    cfg = {'loss_fun': 'batch_hard_triplet', 'triplet_margin': 0.3, 'quanti': True,
           'code_balance_loss': True, 'bin_lut_loss': 'sigmoid', 'q': 4}
    cfg.update(over)
    return cfg


def _probs_and_codes(seed):
    labels, _ = _batch(seed=seed)
    probs = _softmax(np.random.default_rng(seed).normal(size=(len(labels), 6, 4)) * 2)
    codes = (probs * np.arange(4)).sum(-1)
    return labels, codes.astype(np.float32), probs.astype(np.float32)


def test_iom_loss_total_is_the_weighted_sum():
    labels, codes, probs = _probs_and_codes(12)
    total, terms = losses.IoMLoss(_cfg(metric_weight=2.0))(labels, codes, probs, l2=0.8)
    want = {'metric': ref_batch_hard(labels, codes, 0.3), 'l2': 0.8,
            'quanti': np.mean((codes - np.round(codes)) ** 2),
            'bin_lut': ref_bin_lut(probs.astype(np.float64), 4, 'sigmoid'),
            'code_balance': ref_code_balance(probs.astype(np.float64))}
    assert set(terms) == set(want)
    for name, value in want.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    expected = (2.0 * want['metric'] + 0.5 * 0.8 + 0.5 * want['quanti'] + 0.001 * want['bin_lut']
                + want['code_balance'])
    assert float(total) == pytest.approx(expected, rel=1e-4)


def test_iom_loss_switches_and_arc_scale():
    labels, codes, probs = _probs_and_codes(13)
    cfg = _cfg(loss_fun='batch_hard_arc_triplet_loss', quanti=False, code_balance_loss=False,
               bin_lut_loss='none', triplet_margin=0.1)
    total, terms = losses.IoMLoss(cfg)(labels, codes, probs)
    assert float(terms['quanti']) == float(terms['code_balance']) == float(terms['bin_lut']) == 0
    assert float(terms['metric']) == pytest.approx(ref_hard_arc(labels, codes, 0.1, 32.0),
                                                   rel=1e-4)
    assert float(total) == pytest.approx(float(terms['metric']), rel=1e-6)
    z = tf.Variable(np.log(probs))
    with tf.GradientTape() as tape:
        p = tf.nn.softmax(z)
        s = tf.reduce_sum(p * tf.range(4, dtype=tf.float32), -1)
        total, _ = losses.IoMLoss(_cfg())(labels, s, p, l2=0.0)
    grad = tape.gradient(total, z).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_iom_loss_rejects_bad_config():
    # The config check accepts exactly the losses IoMLoss has.
    assert set(LOSS_FUNS) == set(losses.METRIC_LOSSES)
    with pytest.raises(UserError, match='power of 2'):
        losses.IoMLoss(_cfg(q=6))
    losses.IoMLoss(_cfg(q=6, bin_lut_loss='none'))  # q need not be a power of 2 without LUT
