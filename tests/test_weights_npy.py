""".npy weight dicts: the Keras LResNet-IR backbones saved and loaded exactly (iresnet100), every
mismatch named by its layer before anything is set, MMdnn-style per-layer entries, hostile pickles
refused without running, the identity output block, and the parameter counts of iresnet18 ...
iresnet200 (the backbones every converter writes for)."""
import os
import pickle

import numpy as np
import pytest

from modules import backbones
from modules.config import INSIGHT_UNITS
from modules.utils import UserError
from modules.weights import (
    apply_identity_output_layer,
    load_npy_weights,
    read_weight_dict,
    save_npy_weights,
    write_weight_dict,
)
from tests.helpers.iresnet import build, images, randomize
from tests.helpers.pickles import Payload


def test_npy_roundtrip_resnet100_exact(tmp_path):
    model = build('Insight_ResNet100', 112)
    assert model.count_params() == 70_633_152
    randomize(model, seed=3)
    x = images(2, 112)
    want = model(x, training=False).numpy()
    path = str(tmp_path / 'resnet100.npy')
    assert save_npy_weights(model, path) == 308
    fresh = build('Insight_ResNet100', 112)
    assert load_npy_weights(fresh, path) == 308
    got = fresh(x, training=False).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The file is a plain np.save of a dict: numpy itself reads it back the same way.
    plain = np.load(path, allow_pickle=True).item()
    np.testing.assert_array_equal(plain['stage3_unit30_conv2'][0],
                                  fresh.get_layer('stage3_unit30_conv2').get_weights()[0])
    assert len(plain['fc1']) == 3 and plain['__meta__']['backbone'] == 'insight_resnet100'


def test_npy_mismatches_name_the_layer(tmp_path):
    model = build('Insight_ResNet50')
    randomize(model)
    path = str(tmp_path / 'w.npy')
    save_npy_weights(model, path)
    weights = read_weight_dict(path)
    randomize(model, seed=9)  # so that a partial load would be visible

    def load_variant(change):
        variant = {k: (list(v) if isinstance(v, list) else v) for k, v in weights.items()}
        change(variant)
        bad = str(tmp_path / 'bad.npy')
        write_weight_dict(variant, bad)
        before = model.get_layer('stage1_unit1_conv1').get_weights()[0]
        with pytest.raises(UserError) as err:
            load_npy_weights(model, bad)
        # Everything is checked before anything is set: a refused file changes nothing.
        np.testing.assert_array_equal(model.get_layer('stage1_unit1_conv1').get_weights()[0],
                                      before)
        return str(err.value)

    msg = load_variant(lambda w: w.pop('stage2_unit3_bn2'))
    assert "no weights for layer 'stage2_unit3_bn2'" in msg
    msg = load_variant(lambda w: w.update(stage5_unit1_conv1=[np.zeros((3, 3, 8, 8))]))
    assert "unknown layer 'stage5_unit1_conv1'" in msg
    kernel = weights['stage1_unit2_conv1'][0]
    msg = load_variant(lambda w: w.update(stage1_unit2_conv1=[kernel.transpose(3, 2, 0, 1)]))
    assert "'stage1_unit2_conv1'" in msg and '(3, 3, 64, 64)' in msg and 'OIHW' in msg
    msg = load_variant(lambda w: w.update(pre_fc1=[weights['pre_fc1'][0][:-1],
                                                   weights['pre_fc1'][1]]))
    assert "'pre_fc1'" in msg and 'expected shape (4608, 512), got (4607, 512)' in msg
    msg = load_variant(lambda w: w.update(fc1=[np.full(512, 2.0)] + weights['fc1']))
    assert "'fc1'" in msg and 'gamma' in msg
    msg = load_variant(lambda w: w.update(bn0=weights['bn0'][:2]))
    assert "'bn0'" in msg and 'expected 4 arrays' in msg
    nan = weights['relu0'][0].copy()
    nan[0, 0, 0] = np.nan
    msg = load_variant(lambda w: w.update(relu0=[nan]))
    assert "'relu0'" in msg and 'NaN' in msg
    # A 'resnet100' file loaded into the 50-layer model names both problems at once.
    r100 = {'stage3_unit30_bn1': [np.ones(256)] * 4, **weights}
    write_weight_dict(r100, str(tmp_path / 'r100.npy'))
    with pytest.raises(UserError, match="unknown layer 'stage3_unit30_bn1'"):
        load_npy_weights(model, str(tmp_path / 'r100.npy'))
    with pytest.raises(UserError, match='not found'):
        load_npy_weights(model, str(tmp_path / 'absent.npy'))
    np.save(str(tmp_path / 'plain.npy'), np.zeros(3))
    with pytest.raises(UserError, match='plain float64 array'):
        load_npy_weights(model, str(tmp_path / 'plain.npy'))


def test_npy_mmdnn_style_entries_and_per_channel_prelu(tmp_path):
    """Per-layer dicts (MMdnn's 'weights'/'scale'/'bias'/'mean'/'var'/'gamma'), bytes keys."""
    model = build('Insight_ResNet50')
    randomize(model, seed=5)
    for layer in model.layers:  # per-channel alphas, as InsightFace's PReLU has
        if type(layer).__name__ == 'PReLU':
            alpha = layer.get_weights()[0]
            layer.set_weights([np.broadcast_to(alpha[0, 0], alpha.shape).copy()])
    x = images()
    want = model(x, training=False).numpy()
    entries = {}
    for layer in model.layers:
        w = layer.get_weights()
        kind = type(layer).__name__.removeprefix('Fused')
        if kind == 'Conv2D':
            entries[layer.name.encode()] = {b'weights': w[0]}
        elif kind == 'BatchNormalization' and len(w) == 4:
            entries[layer.name] = {'scale': w[0], 'bias': w[1], 'mean': w[2], 'var': w[3]}
        elif kind == 'BatchNormalization':
            entries[layer.name] = {'bias': w[0], 'mean': w[1], 'var': w[2]}
        elif kind == 'PReLU':
            entries[layer.name] = {'gamma': w[0][0, 0]}
        elif kind == 'Dense':
            entries[layer.name] = {'weights': w[0], 'bias': w[1]}
    path = str(tmp_path / 'mmdnn.npy')
    with open(path, 'wb') as fh:
        np.save(fh, entries, allow_pickle=True)
    fresh = build('Insight_ResNet50')
    load_npy_weights(fresh, path)
    np.testing.assert_allclose(fresh(x, training=False).numpy(), want, atol=1e-5)
    # Older writers pickled with protocol 2 (bytes through _codecs.encode): still admitted.
    old = str(tmp_path / 'protocol2.npy')
    _npy_with_pickle(old, pickle.dumps(np.array(entries, dtype=object), protocol=2))
    randomize(fresh, seed=8)
    load_npy_weights(fresh, old)
    np.testing.assert_allclose(fresh(x, training=False).numpy(), want, atol=1e-5)
    entries['bn0'] = {'scale': entries['bn0']['scale'], 'offset': entries['bn0']['bias']}
    with open(path, 'wb') as fh:
        np.save(fh, entries, allow_pickle=True)
    with pytest.raises(UserError, match="layer 'bn0': entry has no 'bias'"):
        load_npy_weights(fresh, path)


def _npy_with_pickle(path, payload_bytes):
    header = {'descr': '|O', 'fortran_order': False, 'shape': ()}
    with open(path, 'wb') as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(payload_bytes)


@pytest.mark.parametrize('protocol', [2, 4])
def test_hostile_npy_is_refused_without_running(tmp_path, protocol):
    marker = str(tmp_path / 'PWNED')
    model_free = str(tmp_path / 'hostile.npy')
    _npy_with_pickle(model_free, pickle.dumps(Payload(marker), protocol=protocol))
    with pytest.raises(UserError, match='refused global'):
        read_weight_dict(model_free)
    # Hidden inside an otherwise valid weight dict, through np.save itself.
    nested = str(tmp_path / 'nested.npy')
    np.save(nested, {'conv0': [np.zeros((3, 3, 3, 64), np.float32)], 'bn0': Payload(marker)},
            allow_pickle=True)
    with pytest.raises(UserError, match='refused global'):
        read_weight_dict(nested)
    assert not os.path.exists(marker)
    # The control: plain pickle would have run it (so the payload is real).
    pickle.loads(pickle.dumps(Payload(marker), protocol=protocol))  # noqa: S301 - the point
    assert os.path.isdir(marker)


def test_identity_output_layer():
    import tensorflow as tf
    layers = tf.keras.layers
    inputs = layers.Input((512,))
    x = layers.BatchNormalization(name='bn_in')(inputs)
    x = layers.Dropout(0.5)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, name='embedding')(x)
    out = layers.BatchNormalization(name='bn_out')(x)
    block = tf.keras.Model(inputs, out)
    randomize(block)
    v = np.random.default_rng(2).normal(0, 3, (4, 512)).astype(np.float32)
    assert np.abs(block(v, training=False).numpy() - v).max() > 0.1
    assert apply_identity_output_layer(block) == 3
    np.testing.assert_allclose(block(v, training=False).numpy(), v, atol=1e-5)
    randomize(block)
    apply_identity_output_layer(block.layers)  # the list-of-layers form
    np.testing.assert_allclose(block(v, training=False).numpy(), v, atol=1e-5)
    narrow = tf.keras.Sequential([layers.Input((512,)), layers.Dense(128, name='embd')])
    with pytest.raises(UserError, match="'embd': a 512->128 Dense"):
        apply_identity_output_layer(narrow)


def keras_parameter_count(units, size=112):
    """Parameters of our Keras LResNet-IR, counted from the architecture (Keras' PReLU has one
    slope per position: H x W x C)."""
    filters, side = (64, 128, 256, 512), size
    total = 3 * 3 * 3 * 64 + 4 * 64 + side * side * 64
    cur = 64
    for count, f in zip(units, filters):
        for unit in range(count):
            total += 4 * cur + 9 * cur * f + 4 * f + side * side * f + 9 * f * f + 4 * f
            if unit == 0:
                total += cur * f + 4 * f
                side = (side + 1) // 2
            cur = f
    return total + 4 * 512 + (512 * side * side + 1) * 512 + 3 * 512


def test_parameter_counts_r18_and_r200():
    for name in ('Insight_ResNet18', 'Insight_ResNet200'):
        model = build(name, 112)
        assert model.count_params() == keras_parameter_count(INSIGHT_UNITS[name]), name
    assert set(backbones.INSIGHT_UNITS) >= {'Insight_ResNet18', 'Insight_ResNet34',
                                            'Insight_ResNet200'}
