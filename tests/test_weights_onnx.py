"""ONNX iresnet graphs (PyTorch legacy and dynamo exports, MXNet-style exports) converted and
compared with onnxruntime; opsets judged by the ops they hold, not their number; graphs that cannot
run or are another network refused with the node named (also an MXNet checkpoint of another
network); verify_onnx's 1 - cos <= 1e-6 rule catching what cosine >= 0.9999 let through.
"""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modules import backbones
from modules.utils import UserError
from modules.weights import mxnet_to_npy, onnx_to_npy, write_weight_dict
from modules.weights.verify import MAX_ONE_MINUS_COS, onnx_embeddings, sample_faces, verify_onnx
from tests.helpers.iresnet import (
    SMALL,
    TINY_UNITS,
    agreement,
    cosine,
    images,
    keras_from_npy,
    source_params,
)
from tests.helpers.mxnet_files import write_mx_params, write_mx_symbol
from tests.helpers.onnx_graphs import TORCH_FEED, declare_input, make_onnx, relabel, run_onnx


def npy_bytes(weights, path):
    write_weight_dict(weights, str(path))
    return open(path, 'rb').read()


def test_onnx_pytorch_style_tiny_matches_onnxruntime(tmp_path, tiny_iresnet):
    side = 3
    params = source_params(TINY_UNITS, side, seed=11, fc1_gamma_random=False)
    # eps 1e-3 (not our 2e-5) on the unfolded BNs checks the epsilon compensation.
    path = make_onnx(params, TINY_UNITS, side, 'pytorch', str(tmp_path / 'tiny.onnx'), eps=1e-3)
    weights, summary = onnx_to_npy(path)
    assert summary['backbone'] == tiny_iresnet and summary['units'] == TINY_UNITS
    assert summary['folded_bn'] == 1 + 2 * sum(TINY_UNITS) + 4  # conv0, conv1/2, conv1sc
    assert '127.5' in summary['input_norm'] and abs(summary['conv0_scale'] - 128 / 127.5) < 1e-12
    assert weights['relu0'][0].shape == (64,) and len(weights['fc1']) == 3
    model = keras_from_npy(weights, tiny_iresnet, tmp_path)
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


@pytest.mark.parametrize('opset', [11, 18])
def test_onnx_opsets_and_export_styles_tiny(tmp_path, tiny_iresnet, opset):
    params = source_params(TINY_UNITS, 3, seed=31 + opset, fc1_gamma_random=True)
    faces = sample_faces(SMALL)
    for style in ('pytorch', 'dynamo'):
        path = make_onnx(params, TINY_UNITS, 3, style, str(tmp_path / f'{style}.onnx'),
                         opset=opset)
        weights, summary = onnx_to_npy(path)
        assert summary['opset'] == opset
        model = keras_from_npy(weights, tiny_iresnet, tmp_path)
        ours = model(faces.astype(np.float32) / 255.0, training=False).numpy()
        cos = cosine(ours, onnx_embeddings(path, faces, TORCH_FEED)[0])
        assert cos.min() > 0.99999, (style, cos)


# ---------------------------------------------------------------------------------------------
# Opsets: the ops present decide, not the version number.


def test_opsets_18_to_28_convert_identically_and_unknown_ops_are_named(tmp_path, tiny_iresnet):
    params = source_params(TINY_UNITS, 3, seed=61, fc1_gamma_random=True)
    src = make_onnx(params, TINY_UNITS, 3, 'dynamo', str(tmp_path / 'm18.onnx'), opset=18)
    weights, summary = onnx_to_npy(src)
    base = npy_bytes(weights, tmp_path / 'm18.npy')
    faces = np.random.default_rng(0).integers(0, 256, (2, SMALL, SMALL, 3), np.uint8)
    ref, _ = onnx_embeddings(src, faces, TORCH_FEED)
    for opset in (19, 20, 21, 22, 28):
        path = relabel(src, str(tmp_path / f'm{opset}.onnx'), opset)
        got, summary = onnx_to_npy(path)
        assert summary['opset'] == opset
        assert npy_bytes(got, tmp_path / f'm{opset}.npy') == base, opset  # byte-identical
        if opset <= 22:  # and onnxruntime runs the relabelled graph to the same embeddings
            np.testing.assert_array_equal(onnx_embeddings(path, faces, TORCH_FEED)[0], ref)
    print(f'\nopset 18 graph relabelled 19, 20, 21, 22, 28: byte-identical .npy ({len(base)} '
          'bytes); onnxruntime output identical up to 22')
    with pytest.raises(UserError, match=r'opset 29 is newer than the installed onnx .* \(up to '
                                        r'28\): its ops cannot be checked'):
        onnx_to_npy(relabel(src, str(tmp_path / 'm29.onnx'), 29))
    # An op the converter does not handle is refused by name, at any opset.
    model = onnx.load(src, load_external_data=False)
    model.opset_import[0].version = 20
    prelu = [n for n in model.graph.node if n.op_type == 'PRelu'][1]
    prelu.op_type = 'LeakyRelu'
    del prelu.input[1:]
    onnx.save(model, tmp_path / 'leaky.onnx')
    with pytest.raises(UserError, match=rf"node '{prelu.name}' is a LeakyRelu, an op this "
                                        r'converter does not handle \(an iresnet graph has only '
                                        r'Add, BatchNormalization, Constant, Conv, '):
        onnx_to_npy(str(tmp_path / 'leaky.onnx'))
    # Old definitions with other semantics (legacy broadcast) and non-standard domains, by name.
    with pytest.raises(UserError, match=r"node 'BatchNormalization_\d+': BatchNormalization as "
                                        r'defined in opset 6 \(the graph declares opset 6\) is not '
                                        r'a definition this converter was checked against'):
        onnx_to_npy(relabel(src, str(tmp_path / 'm6.onnx'), 6, ir_version=3))
    model = onnx.load(src, load_external_data=False)
    conv = [n for n in model.graph.node if n.op_type == 'Conv'][0]
    conv.op_type, conv.domain = 'FusedConv', 'com.microsoft'
    onnx.save(model, tmp_path / 'fused.onnx')
    with pytest.raises(UserError, match=rf"node '{conv.name}' is com.microsoft.FusedConv, not a "
                                        'standard ONNX op'):
        onnx_to_npy(str(tmp_path / 'fused.onnx'))


# ---------------------------------------------------------------------------------------------
# Refusals: graphs that cannot run, other networks.


def test_converters_refuse_other_networks(tmp_path, tiny_iresnet):
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


def test_unrunnable_graphs_are_refused_with_the_node(tmp_path, tiny_iresnet):
    params = source_params(TINY_UNITS, 3, seed=41, fc1_gamma_random=False)
    path = make_onnx(params, TINY_UNITS, 3, 'pytorch', str(tmp_path / 'ok.onnx'))
    model = onnx.load(path)
    prelu = [n for n in model.graph.node if n.op_type == 'PRelu'][2]
    for init in model.graph.initializer:
        if init.name == prelu.input[1]:  # (C, 1, 1) -> (C,), as a hand-made MXNet export has it
            init.dims[:] = [init.dims[0]]
    onnx.save(model, tmp_path / 'slope.onnx')
    # onnxruntime cannot run it either.
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.Fail, match='broadcast'):
        sess = ort.InferenceSession(str(tmp_path / 'slope.onnx'),
                                    providers=['CPUExecutionProvider'])
        sess.run(None, {'input': np.zeros((1, 3, SMALL, SMALL), np.float32)})
    with pytest.raises(UserError, match=rf"PRelu '{prelu.name}' \(stage2_unit1_conv1\): slope "
                                        r'shape \(128,\) does not broadcast per channel'):
        onnx_to_npy(str(tmp_path / 'slope.onnx'))
    dyn = make_onnx(params, TINY_UNITS, 3, 'dynamo', str(tmp_path / 'dyn.onnx'), opset=18)
    # --verify's check: the right weights pass, another network's weights are caught.
    right, wrong = str(tmp_path / 'right.npy'), str(tmp_path / 'wrong.npy')
    write_weight_dict(onnx_to_npy(dyn)[0], right)
    other = source_params(TINY_UNITS, 3, seed=42, fc1_gamma_random=False)
    write_weight_dict(onnx_to_npy(make_onnx(other, TINY_UNITS, 3, 'pytorch',
                                            str(tmp_path / 'other.onnx')))[0], wrong)
    assert verify_onnx(dyn, right, tiny_iresnet, TORCH_FEED)[0].max() < 1e-9
    with pytest.raises(UserError, match=r'disagrees with .*dyn.onnx: 1 - cos = [0-9.e+-]+ on '
                                        r'sample face \d of 6 \(limit 1e-06\)'):
        verify_onnx(dyn, wrong, tiny_iresnet, TORCH_FEED)
    model = onnx.load(dyn)
    for init in model.graph.initializer:
        if init.name == 'flat':
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([1, 512, 9], np.int64), 'flat'))
    onnx.save(model, tmp_path / 'reshape.onnx')
    with pytest.raises(UserError, match=r"Reshape 'Reshape_\d+' to \[1, 512, 9\] is not a flatten"):
        onnx_to_npy(str(tmp_path / 'reshape.onnx'))


# ---------------------------------------------------------------------------------------------
# verify_onnx: 1 - cos <= 1e-6 on every face.


def test_verify_catches_input_scale_and_bn_epsilon_errors(tmp_path, tiny_iresnet):
    """Errors the old rule (cosine >= 0.9999) let through: the /127.5 vs /128 input scale, and an
    uncorrected BN epsilon (1e-5 vs our 2e-5) in a network with small running variances (the
    size of the effect grows as the variances shrink)."""
    params = source_params(TINY_UNITS, 3, seed=85, fc1_gamma_random=False)
    src = declare_input(make_onnx(params, TINY_UNITS, 3, 'pytorch', str(tmp_path / 'p.onnx')),
                        str(tmp_path / 'm.onnx'))
    right, scaled = str(tmp_path / 'right.npy'), str(tmp_path / 'scaled.npy')
    write_weight_dict(onnx_to_npy(src)[0], right)
    write_weight_dict(onnx_to_npy(src, assume_norm=(127.5, 128.0))[0], scaled)
    gap, batch = verify_onnx(src, right, tiny_iresnet, TORCH_FEED)
    assert gap.max() < 1e-9 and batch == 6  # a dynamic batch: all six faces in one run
    with pytest.raises(UserError) as scale_err:
        verify_onnx(src, scaled, tiny_iresnet, TORCH_FEED)
    small = {k: v * 0.02 if k.endswith('_moving_var') else v for k, v in params.items()}
    mx = declare_input(make_onnx(small, TINY_UNITS, 3, 'mxnet', str(tmp_path / 'mx0.onnx'),
                                 eps=1e-5), str(tmp_path / 'mx.onnx'))
    model = onnx.load(mx)
    for node in model.graph.node:  # the eps a careless converter would assume: ours
        for attr in node.attribute:
            if attr.name == 'epsilon':
                attr.f = 2e-5
    onnx.save(model, tmp_path / 'mx_eps.onnx')
    eps_npy = str(tmp_path / 'eps.npy')
    write_weight_dict(onnx_to_npy(str(tmp_path / 'mx_eps.onnx'))[0], eps_npy)
    write_weight_dict(onnx_to_npy(mx)[0], right)
    assert verify_onnx(mx, right, tiny_iresnet, None)[0].max() < 1e-9
    with pytest.raises(UserError) as eps_err:
        verify_onnx(mx, eps_npy, tiny_iresnet, None)
    for err in (scale_err, eps_err):
        message = str(err.value)
        print('\n' + message)
        value = float(message.split('1 - cos = ')[1].split()[0])
        assert MAX_ONE_MINUS_COS == 1e-6 < value < 1e-4  # cosine > 0.9999: passed the old rule
        assert 'on sample face' in message and 'of 6 (limit 1e-06)' in message
