"""Pre-built weights: .npy weight dicts, MXNet .params/-symbol.json and ONNX iresnet conversion.

Most networks here take 33x33 inputs: with odd feature maps before every stride-2 conv, TF's
'same' padding is the symmetric one-pixel padding of MXNet/PyTorch, so the weight mapping is
compared exactly against onnxruntime whatever the backbone's padding for 112x112 inputs.
"""
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modules import backbones
from modules.utils import UserError
from modules.weights import (
    ND_LIST_MAGIC,
    ND_V1_MAGIC,
    ND_V2_MAGIC,
    apply_identity_output_layer,
    convert_checkpoint,
    format_summary,
    load_npy_weights,
    mxnet_to_npy,
    onnx_to_npy,
    read_mxnet_params,
    read_weight_dict,
    save_npy_weights,
    write_weight_dict,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = 33  # 33 -> 17 -> 9 -> 5 -> 3: odd before each stride-2 conv
TINY_UNITS = (1, 2, 1, 1)
FILTERS = (64, 128, 256, 512)
MX_DTYPE_FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2,
                  np.dtype(np.uint8): 3, np.dtype(np.int32): 4, np.dtype(np.int64): 6}


@pytest.fixture
def tiny(monkeypatch):
    """Register a reduced-depth LResNet-IR so building and converting it stays fast."""
    monkeypatch.setitem(backbones.INSIGHT_UNITS, 'Insight_ResNetTiny', TINY_UNITS)
    return 'Insight_ResNetTiny'


def build(backbone_type, size=SMALL):
    """A fresh Insight backbone for square inputs of `size`."""
    return backbones.insight_resnet(backbone_type, (size, size, 3))


def randomize(model, seed=0):
    """Give every weight a random, non-trivial value (BN statistics included)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.weights:
            shape, name = tuple(w.shape), w.name
            if 'moving_variance' in name:
                values.append(rng.uniform(0.5, 2.0, shape))
            elif 'moving_mean' in name or 'beta' in name or 'bias' in name:
                values.append(rng.normal(0, 0.1, shape))
            elif 'gamma' in name:
                values.append(rng.uniform(0.3, 1.2, shape))
            elif 'alpha' in name:
                values.append(rng.uniform(0.0, 0.3, shape))
            else:
                fan_in = int(np.prod(shape[:-1]))
                values.append(rng.normal(0, np.sqrt(1.0 / fan_in), shape))
        if values:
            layer.set_weights([v.astype(np.float32) for v in values])


def images(n=2, size=SMALL, seed=1):
    """RGB float images in [0, 1]."""
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def cosine(a, b):
    """Row-wise cosine similarity."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---------------------------------------------------------------------------------------------
# .npy weight dicts


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


class _Payload:
    """Pickles to a call that would create a marker directory if ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _npy_with_pickle(path, payload_bytes):
    header = {'descr': '|O', 'fortran_order': False, 'shape': ()}
    with open(path, 'wb') as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(payload_bytes)


@pytest.mark.parametrize('protocol', [2, 4])
def test_hostile_npy_is_refused_without_running(tmp_path, protocol):
    marker = str(tmp_path / 'PWNED')
    model_free = str(tmp_path / 'hostile.npy')
    _npy_with_pickle(model_free, pickle.dumps(_Payload(marker), protocol=protocol))
    with pytest.raises(UserError, match='refused global'):
        read_weight_dict(model_free)
    # Hidden inside an otherwise valid weight dict, through np.save itself.
    nested = str(tmp_path / 'nested.npy')
    np.save(nested, {'conv0': [np.zeros((3, 3, 3, 64), np.float32)], 'bn0': _Payload(marker)},
            allow_pickle=True)
    with pytest.raises(UserError, match='refused global'):
        read_weight_dict(nested)
    assert not os.path.exists(marker)
    # The control: plain pickle would have run it (so the payload is real).
    pickle.loads(pickle.dumps(_Payload(marker), protocol=protocol))  # noqa: S301 - the point
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


# ---------------------------------------------------------------------------------------------
# MXNet files written from the format description (pre_models/README.md), not by MXNet.


def write_mx_params(path, named, legacy_v1=()):
    """NDArray list: u64 0x112, u64 0, u64 n, n arrays, u64 n, n (u64 length, utf-8 name)."""
    out = [struct.pack('<QQQ', ND_LIST_MAGIC, 0, len(named))]
    for name, arr in named.items():
        arr = np.ascontiguousarray(arr)
        if name in legacy_v1:
            out.append(struct.pack('<II', ND_V1_MAGIC, arr.ndim))
        else:
            out.append(struct.pack('<Iii', ND_V2_MAGIC, 0, arr.ndim))
        out.append(struct.pack(f'<{arr.ndim}q', *arr.shape))
        out.append(struct.pack('<iii', 1, 0, MX_DTYPE_FLAGS[arr.dtype]))
        out.append(arr.astype(arr.dtype.newbyteorder('<')).tobytes())
    out.append(struct.pack('<Q', len(named)))
    for name in named:
        raw = name.encode()
        out.append(struct.pack('<Q', len(raw)) + raw)
    with open(path, 'wb') as fh:
        fh.write(b''.join(out))


def test_mxnet_params_reader_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    named = {'arg:conv0_weight': rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
             'arg:bn0_gamma': rng.normal(size=8).astype(np.float32),
             'aux:bn0_moving_var': rng.uniform(size=8).astype(np.float64),
             'arg:fc_weight': rng.normal(size=(4, 6)).astype(np.float16),
             'aux:count': np.arange(5, dtype=np.int32),
             'aux:big': np.arange(3, dtype=np.int64).reshape(1, 3)}
    path = str(tmp_path / 'small-0000.params')
    write_mx_params(path, named, legacy_v1=('arg:bn0_gamma',))
    got = read_mxnet_params(path)
    assert list(got) == list(named)
    for name, arr in named.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape
        np.testing.assert_array_equal(got[name], arr)
    data = open(path, 'rb').read()
    for bad, pattern in ((data[:-3], 'truncated|unexpected bytes'),
                         (b'\x13' + data[1:], 'not an MXNet NDArray file'),
                         (data + b'\0', 'unexpected bytes')):
        with open(path, 'wb') as fh:
            fh.write(bad)
        with pytest.raises(UserError, match=pattern):
            read_mxnet_params(path)


def source_params(units, side, seed=0, fc1_gamma_random=True):
    """Random LResNet-IR parameters with MXNet names and layouts (OIHW, FC (out, C*H*W))."""
    rng = np.random.default_rng(seed)
    p = {}

    def conv(name, o, i, k):
        p[name + '_weight'] = rng.normal(0, np.sqrt(1.0 / (i * k * k)), (o, i, k, k))

    def bn(name, c, gamma_scale=1.0, var_scale=1.0):
        p[name + '_gamma'] = rng.uniform(0.5, 1.2, c) * gamma_scale
        p[name + '_beta'] = rng.normal(0, 0.1, c)
        p[name + '_moving_mean'] = rng.normal(0, 0.2, c)
        p[name + '_moving_var'] = rng.uniform(0.05, 2.0, c) * var_scale

    conv('conv0', 64, 3, 3)
    bn('bn0', 64)
    p['relu0_gamma'] = rng.uniform(0, 0.3, 64)
    cur = 64
    for s, (count, f) in enumerate(zip(units, FILTERS), start=1):
        for u in range(1, count + 1):
            n = f'stage{s}_unit{u}'
            bn(n + '_bn1', cur)
            conv(n + '_conv1', f, cur, 3)
            bn(n + '_bn2', f)
            p[n + '_relu1_gamma'] = rng.uniform(0, 0.3, f)
            conv(n + '_conv2', f, f, 3)
            bn(n + '_bn3', f, 0.3)
            if u == 1:
                conv(n + '_conv1sc', f, cur, 1)
                bn(n + '_sc', f)
            cur = f
    bn('bn1', 512)
    p['pre_fc1_weight'] = rng.normal(0, np.sqrt(1.0 / (512 * side * side)), (512, 512 * side * side))
    p['pre_fc1_bias'] = rng.normal(0, 0.1, 512)
    bn('fc1', 512, var_scale=100.0)  # keeps the embedding of the random net near unit scale
    if not fc1_gamma_random:
        p['fc1_gamma'] = np.ones(512)
    return {k: v.astype(np.float32) for k, v in p.items()}


def write_mx_symbol(path, units, train_head=False):
    """A -symbol.json as InsightFace's fresnet writes it (normalisation, 'E' output block)."""
    nodes = []

    def add(op, name, inputs=(), attrs=None, params=()):
        refs = [[i, 0, 0] for i in inputs]
        for param in params:
            nodes.append({'op': 'null', 'name': f'{name}_{param}', 'inputs': []})
            refs.append([len(nodes) - 1, 0, 0])
        nodes.append({'op': op, 'name': name, 'attrs': attrs or {}, 'inputs': refs})
        return len(nodes) - 1

    def conv(name, x, f, k, s):
        return add('Convolution', name, [x], {'kernel': f'({k}, {k})', 'stride': f'({s}, {s})',
                                              'pad': f'({k // 2}, {k // 2})',
                                              'num_filter': str(f), 'no_bias': 'True'},
                   ['weight'])

    def bn(name, x, fix_gamma='False'):
        return add('BatchNorm', name, [x], {'eps': '2e-05', 'fix_gamma': fix_gamma,
                                            'momentum': '0.9'},
                   ['gamma', 'beta', 'moving_mean', 'moving_var'])

    def prelu(name, x):
        return add('LeakyReLU', name, [x], {'act_type': 'prelu'}, ['gamma'])

    x = add('null', 'data')
    nodes[x].pop('attrs')
    x = add('identity', 'id', [x])
    x = add('_minus_scalar', '_minusscalar0', [x], {'scalar': '127.5'})
    x = add('_mul_scalar', '_mulscalar0', [x], {'scalar': '0.0078125'})
    x = prelu('relu0', bn('bn0', conv('conv0', x, 64, 3, 1)))
    plus = 0
    for s, (count, f) in enumerate(zip(units, FILTERS), start=1):
        for u in range(1, count + 1):
            n = f'stage{s}_unit{u}'
            y = bn(n + '_bn1', x)
            y = prelu(n + '_relu1', bn(n + '_bn2', conv(n + '_conv1', y, f, 3, 1)))
            y = bn(n + '_bn3', conv(n + '_conv2', y, f, 3, 2 if u == 1 else 1))
            short = bn(n + '_sc', conv(n + '_conv1sc', x, f, 1, 2)) if u == 1 else x
            x = add('elemwise_add', f'_plus{plus}', [y, short])
            plus += 1
    x = add('Dropout', 'dropout0', [bn('bn1', x)], {'p': '0.4'})
    x = add('FullyConnected', 'pre_fc1', [x], {'num_hidden': '512'}, ['weight', 'bias'])
    x = bn('fc1', x, fix_gamma='True')
    if train_head:  # a training checkpoint's classifier after the embedding
        x = add('FullyConnected', 'fc7', [x], {'num_hidden': '10', 'no_bias': 'True'}, ['weight'])
        x = add('SoftmaxOutput', 'softmax', [x])
    with open(path, 'w') as fh:
        json.dump({'nodes': nodes, 'arg_nodes': [], 'heads': [[x, 0, 0]],
                   'attrs': {'mxnet_version': ['int', 10300]}}, fh)


# ---------------------------------------------------------------------------------------------
# ONNX reference graphs, run by onnxruntime.


def make_onnx(params, units, side, style, path, eps=None, opset=13):
    """An iresnet ONNX graph from MXNet-layout params.

    style 'pytorch': convs with folded BN (bias), BN eps 1e-5, no normalisation in the graph.
    style 'dynamo': as torch.onnx.export does it today: like 'pytorch', but a static batch of 1,
    Reshape to (1, C*H*W) instead of Flatten, the final BN folded into the Gemm, and the weights in
    an external `<name>.data` file beside the model.
    style 'mxnet': Sub 127.5 / Mul 1/128 first, Conv + BatchNormalization (eps 2e-5), and
    fc1's gamma fixed at 1 (MXNet fix_gamma). The parameters always mean BN with eps 2e-5; the
    BatchNormalization nodes' statistics are re-expressed for their own `eps`.
    """
    eps = eps or (2e-5 if style == 'mxnet' else 1e-5)
    nodes, inits = [], []
    counter = [0]

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(op, inputs, **attrs):
        counter[0] += 1
        out = f'{op.lower()}_{counter[0]}'
        nodes.append(helper.make_node(op, inputs, [out], name=f'{op}_{counter[0]}', **attrs))
        return out

    def bn_node(x, name, gamma=None):
        g = params[name + '_gamma'] if gamma is None else gamma
        # Re-express the MXNet statistics for this eps so both graphs compute the same thing.
        var = params[name + '_moving_var'].astype(np.float64) + 2e-5 - eps
        return node('BatchNormalization', [x, const(name + '.g', g),
                                           const(name + '.b', params[name + '_beta']),
                                           const(name + '.m', params[name + '_moving_mean']),
                                           const(name + '.v', var)], epsilon=eps)

    def conv_bn(x, conv, bn, k, s):
        w = params[conv + '_weight'].astype(np.float64)
        attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4)
        if style == 'mxnet':
            return bn_node(node('Conv', [x, const(conv + '.w', w)], **attrs), bn)
        factor = params[bn + '_gamma'] / np.sqrt(params[bn + '_moving_var'].astype(np.float64)
                                                 + 2e-5)
        bias = params[bn + '_beta'] - params[bn + '_moving_mean'] * factor
        return node('Conv', [x, const(conv + '.w', w * factor[:, None, None, None]),
                             const(conv + '.bias', bias)], **attrs)

    def prelu(x, name):
        slope = params[name + '_gamma'].reshape(-1, 1, 1)
        return node('PRelu', [x, const(name + '.slope', slope)])

    x = 'input'
    if style == 'mxnet':
        x = node('Mul', [node('Sub', [x, const('mean', 127.5)]), const('scale', 1 / 128)])
    x = prelu(conv_bn(x, 'conv0', 'bn0', 3, 1), 'relu0')
    for s, count in enumerate(units, start=1):
        for u in range(1, count + 1):
            n = f'stage{s}_unit{u}'
            y = bn_node(x, n + '_bn1')
            y = prelu(conv_bn(y, n + '_conv1', n + '_bn2', 3, 1), n + '_relu1')
            y = conv_bn(y, n + '_conv2', n + '_bn3', 3, 2 if u == 1 else 1)
            short = conv_bn(x, n + '_conv1sc', n + '_sc', 1, 2) if u == 1 else x
            x = node('Add', [y, short])
    fc_w = params['pre_fc1_weight'].astype(np.float64)
    fc_b = params['pre_fc1_bias'].astype(np.float64)
    if style == 'dynamo':
        inits.append(numpy_helper.from_array(np.array([1, fc_w.shape[1]], np.int64), 'flat'))
        x = node('Reshape', [bn_node(x, 'bn1'), 'flat'])
        factor = params['fc1_gamma'] / np.sqrt(params['fc1_moving_var'].astype(np.float64) + 2e-5)
        out = node('Gemm', [x, const('fc.w', fc_w * factor[:, None]),
                            const('fc.b', (fc_b - params['fc1_moving_mean']) * factor
                                  + params['fc1_beta'])], transB=1)
    else:
        x = node('Flatten', [bn_node(x, 'bn1')], axis=1)
        x = node('Gemm', [x, const('fc.w', fc_w), const('fc.b', fc_b)], transB=1)
        gamma = np.ones(512) if style == 'mxnet' else None
        out = bn_node(x, 'fc1', gamma)
    nodes.append(helper.make_node('Identity', [out], ['embedding'], name='output'))
    # The feature-map side before the FC gives the input size (33 -> 3, 112 -> 7).
    batch, spatial = (1, {3: SMALL, 7: 112}[side]) if style == 'dynamo' else (None, None)
    graph = helper.make_graph(
        nodes, 'iresnet', [helper.make_tensor_value_info('input', TensorProto.FLOAT,
                                                          [batch, 3, spatial, spatial])],
        [helper.make_tensor_value_info('embedding', TensorProto.FLOAT, [batch, 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if style == 'dynamo':
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + '.data', size_threshold=1024)
    else:
        onnx.save(model, path)
    return path


def run_onnx(path, x01, style):
    """onnxruntime embedding of RGB [0, 1] NHWC images, fed as the model expects."""
    pixels = np.transpose(x01.astype(np.float64) * 255.0, (0, 3, 1, 2))
    feed = pixels if style == 'mxnet' else (pixels - 127.5) / 127.5
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return sess.run(None, {'input': feed.astype(np.float32)})[0]


def keras_from_npy(weights, backbone_type, tmp_path, size=SMALL):
    """A backbone loaded from a converted weight dict (through the .npy file)."""
    path = str(tmp_path / 'converted.npy')
    write_weight_dict(weights, path)
    model = build(backbone_type, size)
    load_npy_weights(model, path)
    return model


def agreement(keras_out, onnx_out):
    """(max abs difference, max relative to the embedding scale, min cosine)."""
    diff = np.abs(keras_out - onnx_out).max()
    return diff, diff / np.abs(onnx_out).max(), cosine(keras_out, onnx_out).min()


def test_onnx_pytorch_style_tiny_matches_onnxruntime(tmp_path, tiny):
    side = 3
    params = source_params(TINY_UNITS, side, seed=11, fc1_gamma_random=False)
    # eps 1e-3 (not our 2e-5) on the unfolded BNs checks the epsilon compensation.
    path = make_onnx(params, TINY_UNITS, side, 'pytorch', str(tmp_path / 'tiny.onnx'), eps=1e-3)
    weights, summary = onnx_to_npy(path)
    assert summary['backbone'] == tiny and summary['units'] == TINY_UNITS
    assert summary['folded_bn'] == 1 + 2 * sum(TINY_UNITS) + 4  # conv0, conv1/2, conv1sc
    assert '127.5' in summary['input_norm'] and abs(summary['conv0_scale'] - 128 / 127.5) < 1e-12
    assert weights['relu0'][0].shape == (64,) and len(weights['fc1']) == 3
    model = keras_from_npy(weights, tiny, tmp_path)
    x = images(3)
    keras_out = model(x, training=False).numpy()
    diff, rel, cos = agreement(keras_out, run_onnx(path, x, 'pytorch'))
    print(f'\nONNX (PyTorch-style, tiny): max |diff| {diff:.2e}, relative {rel:.2e}, '
          f'min cosine {cos:.8f}, embedding scale {np.abs(keras_out).max():.2f}')
    assert diff < 1e-4 and cos > 0.9999


def test_onnx_resnet50_with_final_bn_gamma_folded(tmp_path):
    """Full R50 graph; fc1 has a real gamma, which our scale-free fc1 takes via pre_fc1."""
    side = 3
    units = backbones.INSIGHT_UNITS['Insight_ResNet50']
    params = source_params(units, side, seed=12, fc1_gamma_random=True)
    path = make_onnx(params, units, side, 'pytorch', str(tmp_path / 'r50.onnx'))
    weights, summary = onnx_to_npy(path, backbone='Insight_ResNet50')
    assert summary['layers'] == 158
    np.testing.assert_allclose(weights['fc1'][0], 0, atol=0)  # beta: folded into pre_fc1
    model = keras_from_npy(weights, 'Insight_ResNet50', tmp_path)
    x = images(2)
    keras_out = model(x, training=False).numpy()
    diff, rel, cos = agreement(keras_out, run_onnx(path, x, 'pytorch'))
    print(f'\nONNX (PyTorch-style, R50): max |diff| {diff:.2e}, relative {rel:.2e}, '
          f'min cosine {cos:.8f}, embedding scale {np.abs(keras_out).max():.2f}')
    assert diff < 1e-4 and cos > 0.9999
    with pytest.raises(UserError, match=r'has \[3, 4, 14, 3\] units per stage, but '
                                        'Insight_ResNet100'):
        onnx_to_npy(path, backbone='Insight_ResNet100')


def test_mxnet_checkpoint_resnet50_matches_mxnet_style_onnx(tmp_path):
    side = 3
    units = backbones.INSIGHT_UNITS['Insight_ResNet50']
    params = source_params(units, side, seed=13, fc1_gamma_random=True)  # ignored: fix_gamma
    prefix = str(tmp_path / 'model-r50')
    write_mx_symbol(prefix + '-symbol.json', units, train_head=True)
    named = {('aux:' if k.endswith(('_moving_mean', '_moving_var')) else 'arg:') + k: v
             for k, v in params.items()}
    named['arg:fc7_weight'] = np.zeros((10, 512), np.float32)  # classifier: not ours
    write_mx_params(prefix + '-0003.params', named)
    weights, summary = mxnet_to_npy(prefix, epoch=3)
    assert summary['backbone'] == 'Insight_ResNet50' and summary['ignored'] == ['fc7_weight']
    assert summary['conv0_scale'] == 1.0 and '(x - 127.5) / 128' in summary['input_norm']
    # Layouts: OIHW -> HWIO, and PReLU slopes stay per channel.
    np.testing.assert_array_equal(weights['stage2_unit1_conv2'][0],
                                  params['stage2_unit1_conv2_weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(weights['stage1_unit1_relu1'][0], params['stage1_unit1_relu1_gamma'])
    model = keras_from_npy(weights, 'Insight_ResNet50', tmp_path)
    reference = make_onnx(params, units, side, 'mxnet', str(tmp_path / 'mx.onnx'))
    x = images(2)
    keras_out = model(x, training=False).numpy()
    diff, rel, cos = agreement(keras_out, run_onnx(reference, x, 'mxnet'))
    print(f'\nMXNet checkpoint (R50) vs MXNet-style ONNX: max |diff| {diff:.2e}, relative '
          f'{rel:.2e}, min cosine {cos:.8f}')
    assert diff < 1e-4 and cos > 0.9999
    summary = convert_checkpoint(prefix + '-0003.params', str(tmp_path / 'cli.npy'))
    assert summary['layers'] == 158 and 'model-r50-0003.params' in summary['source']
    # The same network exported MXNet -> ONNX (Sub/Mul inside, BN unfolded) converts alike.
    onnx_weights, onnx_summary = onnx_to_npy(reference)
    assert onnx_summary['folded_bn'] == 0 and 'inside the graph' in onnx_summary['input_norm']
    for name in ('conv0', 'stage3_unit7_bn2', 'pre_fc1', 'fc1', 'relu0'):
        for a, b in zip(onnx_weights[name], weights[name]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_converters_refuse_other_networks(tmp_path, tiny):
    side = 3
    params = source_params(TINY_UNITS, side, seed=1, fc1_gamma_random=False)
    odd_units = (1, 1, 1, 1)
    odd = {k: v for k, v in params.items() if 'stage2_unit2' not in k}
    path = make_onnx(odd, odd_units, side, 'pytorch', str(tmp_path / 'odd.onnx'))
    with pytest.raises(UserError, match=r'unsupported depth: \[1, 1, 1, 1\] units'):
        onnx_to_npy(path)
    model = onnx.load(path)
    for n in model.graph.node:
        if n.op_type == 'Conv':
            for a in n.attribute:
                if a.name == 'strides' and list(a.ints) == [2, 2]:
                    a.ints[:] = [1, 1]
                    break
            else:
                continue
            break
    onnx.save(model, path)
    with pytest.raises(UserError, match=r"Conv .*stage1_unit1_conv2.*expected \(\(3, 3\), \(2, 2\)"):
        onnx_to_npy(path)
    with open(tmp_path / 'junk.onnx', 'wb') as fh:
        fh.write(b'not a protobuf at all \xff\xff')
    with pytest.raises(UserError, match='not a readable ONNX model'):
        onnx_to_npy(str(tmp_path / 'junk.onnx'))
    prefix = str(tmp_path / 'mx')
    write_mx_symbol(prefix + '-symbol.json', TINY_UNITS)
    named = {'arg:' + k: v for k, v in params.items() if k != 'stage4_unit1_conv2_weight'}
    write_mx_params(prefix + '-0000.params', named)
    with pytest.raises(UserError, match="missing parameter 'stage4_unit1_conv2_weight'"):
        mxnet_to_npy(prefix)
    sym = json.load(open(prefix + '-symbol.json'))
    for n in sym['nodes']:
        if n['name'] == 'stage2_unit2_relu1':
            n['attrs']['act_type'] = 'leaky'
    json.dump(sym, open(prefix + '-symbol.json', 'w'))
    with pytest.raises(UserError, match="'stage2_unit2_relu1' has act_type 'leaky'"):
        mxnet_to_npy(prefix)


def test_cli_converts_and_reports(tmp_path):
    side = 3
    units = backbones.INSIGHT_UNITS['Insight_ResNet50']
    params = source_params(units, side, seed=4, fc1_gamma_random=False)
    src = make_onnx(params, units, side, 'pytorch', str(tmp_path / 'r50.onnx'))
    out = str(tmp_path / 'resnet50' / 'resnet50.npy')
    script = os.path.join(ROOT, 'pre_models', 'convert_insightface.py')
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    done = subprocess.run([sys.executable, script, f'--input={src}', f'--output={out}'],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'Insight_ResNet50' in done.stdout and '158 weighted layers' in done.stdout
    assert 'conv0 kernel scaled by 1.0039216' in done.stdout and 'time:' in done.stdout
    assert read_weight_dict(out)['__meta__']['source'] == 'onnx'
    bad = subprocess.run([sys.executable, script, f'--input={tmp_path}/absent.onnx',
                          f'--output={tmp_path}/x.npy'], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and 'ONNX file not found' in bad.stderr
    assert not os.path.exists(f'{tmp_path}/x.npy')
    summary = convert_checkpoint(src, str(tmp_path / 'again.npy'))
    assert 'folded into the following BN' in format_summary(summary)


def test_112_inputs_reproduce_the_source(tmp_path):
    """At 112x112 the stride-2 convs see even sizes: the backbone pads like MXNet/PyTorch (one
    pixel on every side), so converted weights reproduce the source embedding."""
    import warnings
    side = 7
    units = backbones.INSIGHT_UNITS['Insight_ResNet50']
    params = source_params(units, side, seed=14, fc1_gamma_random=False)
    path = make_onnx(params, units, side, 'pytorch', str(tmp_path / 'r50_112.onnx'))
    weights, _ = onnx_to_npy(path)
    npy = str(tmp_path / 'r50_112.npy')
    write_weight_dict(weights, npy)
    model = build('Insight_ResNet50', 112)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        load_npy_weights(model, npy)
    x = images(2, 112)
    keras_out = model(x, training=False).numpy()
    diff, rel, cos = agreement(keras_out, run_onnx(path, x, 'pytorch'))
    print(f'\nONNX (PyTorch-style, R50, 112x112): max |diff| {diff:.2e}, relative '
          f'{rel:.2e}, min cosine {cos:.8f}')
    assert not caught
    assert rel < 1e-5 and cos > 0.9999
