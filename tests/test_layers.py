"""Layers: ArcFace margin logits, PermLayer, IoMHead, IoM projection and hidden-layer variants."""
import math

import numpy as np
import pytest
import tensorflow as tf

from modules.layers import (
    ArcMarginPenaltyLogists,
    IoMHead,
    IoMProjection,
    PermLayer,
    iom_hidden_layers,
    key_permutation,
)
from modules.utils import UserError


def _np_arc_logits(embds, w, labels, margin, scale):
    """Reference written with angles: t = acos(cos), cos(t + m) while t + m < pi."""
    e = embds / np.linalg.norm(embds, axis=1, keepdims=True)
    wn = w / np.linalg.norm(w, axis=0, keepdims=True)
    cos = e @ wn
    out = cos.copy()
    fallback = []
    for i, c in enumerate(labels):
        t = math.acos(min(1.0, max(-1.0, cos[i, c])))
        if t + margin < math.pi:
            out[i, c] = math.cos(t + margin)
            fallback.append(False)
        else:
            out[i, c] = cos[i, c] - margin * math.sin(margin)
            fallback.append(True)
    return out * scale, np.array(fallback)


def test_arc_margin_logits_match_numpy_including_fallback():
    rng = np.random.default_rng(0)
    embd_dim, num_classes, margin, scale = 6, 5, 0.5, 64.0
    layer = ArcMarginPenaltyLogists(num_classes, margin=margin, logist_scale=scale)
    embds = rng.normal(size=(7, embd_dim)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0, 2])
    layer((embds, labels))  # build
    w = rng.normal(size=(embd_dim, num_classes)).astype(np.float32)
    layer.set_weights([w])
    # Sample 0 points almost opposite to its class centre: t + m > pi, the fallback branch.
    embds[0] = -w[:, 0] + 0.05 * rng.normal(size=embd_dim)
    # Sample 1 sits exactly on its class centre: t = 0, sin t clipped.
    embds[1] = w[:, 1]
    got = layer((embds, labels)).numpy()
    want, fallback = _np_arc_logits(embds.astype(np.float64), w.astype(np.float64), labels,
                                    margin, scale)
    assert fallback[0] and not fallback[1:].any()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)
    assert got.shape == (7, num_classes)


def test_arc_margin_gradient_finite_and_config_round_trip():
    layer = ArcMarginPenaltyLogists(3, margin=0.3, logist_scale=16, name='arc')
    embds = tf.Variable(np.eye(3, 4, dtype=np.float32))
    labels = np.array([0, 1, 2])
    layer((embds, labels))
    layer.set_weights([np.eye(4, 3, dtype=np.float32)])  # cos t = 1 exactly on the targets
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer((embds, labels)))
    grads = tape.gradient(loss, [embds, layer.w])
    assert all(np.isfinite(g.numpy()).all() for g in grads)
    config = layer.get_config()
    clone = ArcMarginPenaltyLogists.from_config(config)
    assert (clone.num_classes, clone.margin, clone.logist_scale) == (3, 0.3, 16.0)
    assert clone.name == 'arc'
    with pytest.raises(UserError, match='num_classes'):
        ArcMarginPenaltyLogists(0)


def test_perm_layer_is_a_constant_permutation():
    x = np.arange(2 * 10, dtype=np.float32).reshape(2, 10)
    inp = tf.keras.Input((10,))
    layer = PermLayer(perm_key=7)
    model = tf.keras.Model(inp, layer(inp))
    assert layer.count_params() == 0 and model.count_params() == 0
    assert not layer.weights
    lines = []
    model.summary(print_fn=lambda line, *a, **k: lines.append(line))
    row = [line for line in '\n'.join(lines).splitlines() if 'perm_layer' in line]
    assert len(row) == 1 and row[0].rstrip('│ ').split()[-1] == '0'
    np.testing.assert_array_equal(model(x).numpy(), x[:, key_permutation(7, 10)])
    np.testing.assert_array_equal(key_permutation(7, 10),
                                  np.random.default_rng(7).permutation(10))
    assert layer.get_config()['perm_key'] == 7
    clone = PermLayer.from_config(layer.get_config())
    np.testing.assert_array_equal(clone(x).numpy(), model(x).numpy())


def test_perm_layer_identity_without_key_and_keys_differ():
    x = np.random.default_rng(1).normal(size=(3, 512)).astype(np.float32)
    np.testing.assert_array_equal(PermLayer()(x).numpy(), x)
    np.testing.assert_array_equal(key_permutation(None, 5), np.arange(5))
    a, b = PermLayer(1)(x).numpy(), PermLayer(2)(x).numpy()
    assert not np.array_equal(a, b) and not np.array_equal(a, x)
    np.testing.assert_array_equal(np.sort(a, axis=1), np.sort(x, axis=1))
    for bad in (-1, 1.5, 'key', True):
        with pytest.raises(UserError, match='perm_key'):
            PermLayer(bad)


def _np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize('jit', [True, False])
def test_iom_head_soft_and_hard_indices(jit):
    m, q, batch = 6, 8, 5
    rng = np.random.default_rng(2)
    x = (3 * rng.normal(size=(batch, m * q))).astype(np.float32)
    head = IoMHead(m, q, T=0.7, jit_compile=jit)
    soft = head(x, training=True).numpy()
    hard = head(x, training=False)
    assert soft.shape == (batch, m) and soft.dtype == np.float32
    assert hard.shape == (batch, m) and hard.dtype == tf.int32
    assert soft.min() >= 0.0 and soft.max() <= q - 1
    probs_ref = _np_softmax(x.reshape(batch, m, q).astype(np.float64) / 0.7)
    np.testing.assert_allclose(head.probabilities(x).numpy(), probs_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(soft, (probs_ref * np.arange(q)).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(hard.numpy(), x.reshape(batch, m, q).argmax(-1))
    # Inference is the default, as in model.predict.
    np.testing.assert_array_equal(head(x).numpy(), hard.numpy())


def test_iom_head_soft_tends_to_hard_as_temperature_falls():
    m, q, batch = 16, 8, 4
    rng = np.random.default_rng(3)
    # Per group a shuffled ramp plus noise: the top two logits differ by about 1.
    z = np.stack([rng.permutation(q) for _ in range(batch * m)]).astype(np.float32)
    x = (z + 0.01 * rng.normal(size=z.shape)).reshape(batch, m * q).astype(np.float32)
    cold = IoMHead(m, q, T=1e-3)
    soft = cold(x, training=True).numpy()
    np.testing.assert_array_equal(np.round(soft).astype(np.int32),
                                  cold(x, training=False).numpy())
    warm = IoMHead(m, q, T=10.0)(x, training=True).numpy()
    assert np.abs(warm - np.round(warm)).max() > 0.1  # a warm softmax is far from integers


@pytest.mark.parametrize('jit', [True, False])
def test_iom_head_hand_written_gradient_matches_autodiff(jit):
    """The custom gradient of (soft indices, probabilities) equals TF's own differentiation."""
    m, q, T = 4, 8, 0.3
    rng = np.random.default_rng(6)
    x = tf.Variable(rng.normal(size=(5, m * q)).astype(np.float32))
    w_s = tf.constant(rng.normal(size=(5, m)).astype(np.float32))
    w_p = tf.constant(rng.normal(size=(5, m, q)).astype(np.float32))
    head = IoMHead(m, q, T=T, jit_compile=jit)

    def plain(v):
        p = tf.nn.softmax(tf.reshape(v, [-1, m, q]) / T, axis=-1)
        return tf.reduce_sum(p * tf.range(q, dtype=tf.float32), axis=-1), p

    for use_s, use_p in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        with tf.GradientTape(persistent=True) as tape:
            s, p = head.soft_outputs(x)
            rs, rp = plain(x)
            loss = use_s * tf.reduce_sum(s * w_s) + use_p * tf.reduce_sum(p * w_p)
            ref = use_s * tf.reduce_sum(rs * w_s) + use_p * tf.reduce_sum(rp * w_p)
        np.testing.assert_allclose(s.numpy(), rs.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(tape.gradient(loss, x).numpy(), tape.gradient(ref, x).numpy(),
                                   rtol=1e-4, atol=1e-5)

    @tf.function
    def graph_grad():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(head(x, training=True) * w_s)
        return tape.gradient(loss, x)

    with tf.GradientTape() as tape:
        ref = tf.reduce_sum(plain(x)[0] * w_s)
    np.testing.assert_allclose(graph_grad().numpy(), tape.gradient(ref, x).numpy(), rtol=1e-4,
                               atol=1e-5)


def test_iom_head_config_checks_and_gradient():
    head = IoMHead(4, 8, T=0.01, jit_compile=False, name='IoMHead')
    config = head.get_config()
    clone = IoMHead.from_config(config)
    assert (clone.m, clone.q, clone.T, clone.name) == (4, 8, 0.01, 'IoMHead')
    assert clone.jit_compile is False and IoMHead(4, 8).jit_compile is True
    with pytest.raises(ValueError, match='32 input features'):
        head(np.zeros((2, 30), np.float32))
    with pytest.raises(UserError, match='T must be > 0'):
        IoMHead(4, 8, T=0)
    with pytest.raises(UserError, match='q must be at least 2'):
        IoMHead(4, 1)
    x = tf.Variable(np.random.default_rng(4).normal(size=(3, 32)).astype(np.float32))
    with tf.GradientTape() as tape:
        s = tf.reduce_sum(IoMHead(4, 8, T=1.0)(x, training=True))
    grad = tape.gradient(s, x).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_iom_projection_parameter_count_and_init():
    inp = tf.keras.Input((512,))
    proj = IoMProjection(512, 8, seed=0)
    out = proj(inp)
    assert proj.name == 'IoMProjection' and out.shape[-1] == 4096
    assert proj.count_params() == 2_101_248
    kernel = proj.kernel.numpy()
    assert abs(kernel.mean()) < 0.01 and abs(kernel.std() - 1.0) < 0.01


@pytest.mark.parametrize('remark,kinds,units', [
    ('1', [], []),
    ('T1', [], []),
    ('2', ['Dense', 'FusedBatchNormalization', 'Dropout'], [1024]),
    ('3', ['Dense', 'Dropout', 'FusedBatchNormalization'] * 2, [512, 512]),
    ('T2', ['Dense', 'Dropout', 'FusedBatchNormalization'] * 2, [512, 512]),
])
def test_iom_hidden_layers(remark, kinds, units):
    layers = iom_hidden_layers(remark, name_prefix='h_')
    assert [type(layer).__name__ for layer in layers] == kinds
    dense = [layer for layer in layers if isinstance(layer, tf.keras.layers.Dense)]
    assert [d.units for d in dense] == units
    assert all(layer.name.startswith('h_') for layer in layers)
    if remark in ('3', 'T2'):
        assert all(d.activation.__name__ == 'relu' for d in dense)
    x = np.ones((2, 16), np.float32)
    for layer in layers:
        x = layer(x)
    assert x.shape[-1] == (units[-1] if units else 16)


def test_iom_hidden_layers_rejects_unknown_remark():
    with pytest.raises(UserError, match="hidden_layer_remark is '4'"):
        iom_hidden_layers('4')


def test_iom_stack_saves_and_loads(tmp_path):
    inp = tf.keras.Input((16,))
    x = PermLayer(5)(inp)
    x = IoMProjection(4, 4)(x)
    out = IoMHead(4, 4, T=0.5, name='IoMHead')(x)
    model = tf.keras.Model(inp, out)
    path = str(tmp_path / 'iom.keras')
    model.save(path)
    loaded = tf.keras.models.load_model(path)
    data = np.random.default_rng(5).normal(size=(3, 16)).astype(np.float32)
    np.testing.assert_array_equal(loaded(data).numpy(), model(data).numpy())
    np.testing.assert_allclose(loaded(data, training=True).numpy(),
                               model(data, training=True).numpy(), rtol=1e-6)
    assert loaded.layers[1].perm_key == 5
