"""MXNet checkpoints (-symbol.json and .params, written from the format description): the NDArray
reader on every dtype and damaged file, and an iresnet50 training checkpoint converted and compared
with onnxruntime running the same network exported MXNet-style (normalisation nodes, BN unfolded).
"""
import numpy as np
import pytest

from modules import backbones
from modules.utils import UserError
from modules.weights import convert_checkpoint, mxnet_to_npy, onnx_to_npy, read_mxnet_params
from tests.helpers.iresnet import agreement, images, keras_from_npy, source_params
from tests.helpers.mxnet_files import write_mx_params, write_mx_symbol
from tests.helpers.onnx_graphs import make_onnx, run_onnx


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
