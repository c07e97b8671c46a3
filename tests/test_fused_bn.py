"""FusedBatchNormalization: same numbers as Keras' BatchNormalization, on the fused kernel."""
import numpy as np
import pytest
import tensorflow as tf

from modules.backbones import Backbone
from modules.layers import FusedBatchNormalization
from modules.models import ArcFaceModel

MOMENTUM, EPS = 0.9, 2e-5


def pair(shape, seed=0, **kwargs):
    """A Keras BN and a fused BN with the same random weights, and an input batch."""
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(2.0, 3.0, shape).astype('float32'))
    keras_bn = tf.keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPS, **kwargs)
    fused_bn = FusedBatchNormalization(momentum=MOMENTUM, epsilon=EPS, **kwargs)
    keras_bn.build(x.shape)
    fused_bn.build(x.shape)
    c = shape[-1]
    weights = [rng.normal(size=c).astype('float32') for _ in keras_bn.weights[:-1]]
    weights.append(rng.uniform(0.5, 2.0, c).astype('float32'))
    keras_bn.set_weights(weights)
    fused_bn.set_weights(weights)
    return keras_bn, fused_bn, x


SHAPES = [(8, 5, 5, 6), (16, 6)]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('scale', [True, False])
def test_inference_equals_keras(shape, scale):
    keras_bn, fused_bn, x = pair(shape, scale=scale)
    np.testing.assert_allclose(fused_bn(x, training=False), keras_bn(x, training=False),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('shape', SHAPES)
def test_training_outputs_statistics_and_gradients(shape):
    keras_bn, fused_bn, x = pair(shape, seed=1)
    old_var = keras_bn.moving_variance.numpy()
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        outs = [bn(x, training=True) for bn in (keras_bn, fused_bn)]
        losses = [tf.reduce_sum(y * tf.sin(y)) for y in outs]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(fused_bn.moving_mean, keras_bn.moving_mean, atol=1e-6)
    # Moving variance: the fused kernel feeds the unbiased batch variance (x n/(n-1)) into the
    # running average, Keras 3 the biased one. Both are checked exactly against that definition.
    flat = x.numpy().reshape(-1, shape[-1]).astype('float64')
    n = flat.shape[0]
    biased = flat.var(axis=0)
    np.testing.assert_allclose(keras_bn.moving_variance, MOMENTUM * old_var + (1 - MOMENTUM) * biased,
                               rtol=1e-5)
    np.testing.assert_allclose(fused_bn.moving_variance,
                               MOMENTUM * old_var + (1 - MOMENTUM) * biased * n / (n - 1),
                               rtol=1e-5)
    grads = [tape.gradient(loss, [x, bn.gamma, bn.beta])
             for loss, bn in zip(losses, (keras_bn, fused_bn))]
    for want, got in zip(*grads):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-4)


def test_frozen_layer_uses_moving_statistics_in_training_mode():
    keras_bn, fused_bn, x = pair((4, 3, 3, 5), seed=2)
    fused_bn.trainable = False
    keras_bn.trainable = False
    before = fused_bn.moving_mean.numpy()
    np.testing.assert_allclose(fused_bn(x, training=True), keras_bn(x, training=True), atol=1e-5)
    np.testing.assert_array_equal(fused_bn.moving_mean, before)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_half_precision_input_float32_statistics(dtype):
    keras_bn, fused_bn, x = pair((8, 4, 4, 6), seed=3, dtype='mixed_' + dtype)
    for training in (False, True):
        y = fused_bn(tf.cast(x, dtype), training=training)
        assert y.dtype == dtype
        want = keras_bn(tf.cast(x, dtype), training=training)
        np.testing.assert_allclose(tf.cast(y, 'float32'), tf.cast(want, 'float32'), atol=0.05,
                                   rtol=0.02)
    assert fused_bn.moving_mean.dtype == tf.float32


def test_masked_or_rank3_input_falls_back_to_keras_ops():
    keras_bn, fused_bn, _ = pair((4, 7, 6), seed=4)
    x = tf.random.normal((4, 7, 6), seed=4)
    np.testing.assert_allclose(fused_bn(x, training=True), keras_bn(x, training=True), atol=1e-5)


@pytest.mark.parametrize('backbone', ['MobileNetV2', 'Insight_ResNet18'])
def test_every_batch_norm_of_a_model_is_fused(backbone):
    model = ArcFaceModel(size=112, backbone_type=backbone, use_pretrain=False)
    bns = [layer for layer in _all_layers(model)
           if isinstance(layer, tf.keras.layers.BatchNormalization)]
    assert bns and all(isinstance(layer, FusedBatchNormalization) for layer in bns)
    if backbone == 'MobileNetV2':
        assert {layer.momentum for layer in bns} == {MOMENTUM}


def test_keras_application_keeps_layer_names_and_weights():
    net = Backbone('MobileNetV2', 112, use_pretrain=False)
    inner = net.layers[-1]
    reference = tf.keras.applications.MobileNetV2(input_shape=(112, 112, 3), include_top=False,
                                                  weights=None)
    def weighted(model):
        return [layer.name for layer in model.layers if layer.weights]

    assert inner.name == reference.name
    assert weighted(inner) == weighted(reference)
    assert inner.count_params() == reference.count_params()


def test_checkpoint_of_keras_batch_norm_model_loads_into_fused(tmp_path):
    """A checkpoint written before the switch (Keras BN layers) restores into today's model."""
    def output_block(bn_class):
        inputs = tf.keras.Input((4, 4, 8))
        x = bn_class(momentum=MOMENTUM, name='bn_in')(inputs)
        x = tf.keras.layers.Flatten()(x)
        x = tf.keras.layers.Dense(16, name='embedding')(x)
        return tf.keras.Model(inputs, bn_class(momentum=MOMENTUM, name='bn_out')(x))

    old = output_block(tf.keras.layers.BatchNormalization)
    x = tf.random.normal((8, 4, 4, 8), seed=5)
    for _ in range(3):
        old(x, training=True)  # moving statistics away from their initial values
    path = tf.train.Checkpoint(model=old).save(str(tmp_path / 'ckpt'))
    new = output_block(FusedBatchNormalization)
    tf.train.Checkpoint(model=new).restore(path).assert_existing_objects_matched()
    np.testing.assert_allclose(new(x, training=False), old(x, training=False), atol=1e-5)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, tf.keras.Model):
            yield from _all_layers(layer)
