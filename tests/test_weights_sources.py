"""Weights round 2: arcface_torch .pth state dicts, dynamo-exported ONNX, iresnet18 ... iresnet200.

The .pth files are written here from the documented torch.save zip format (no PyTorch needed):
the pickle names `torch._utils._rebuild_tensor_v2` and `torch.<Type>Storage` through stand-in
modules that exist only while pickling. Every source is compared with onnxruntime running an ONNX
graph of the same parameters, on the project's real face photos (data/samples).
"""
import collections
import contextlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import types
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_weights import (  # the helpers that build iresnet ONNX graphs from random parameters
    ROOT,
    SMALL,
    TINY_UNITS,
    _Payload,
    build,
    keras_from_npy,
    make_onnx,
    source_params,
)

from modules import backbones
from modules.config import INSIGHT_UNITS
from modules.utils import UserError
from modules.weights import onnx_to_npy, write_weight_dict
from modules.weights.torch_pth import pth_to_npy
from modules.weights.verify import (
    MAX_ONE_MINUS_COS,
    onnx_embeddings,
    sample_faces,
    verify_onnx,
)

TORCH_FEED = (1 / 127.5, -1.0)  # arcface_torch's (x - 127.5) / 127.5 on 0..255 pixels
R18 = INSIGHT_UNITS['Insight_ResNet18']


# ---------------------------------------------------------------------------------------------
# Writing torch.save zip files without torch.


class _Storage:
    def __init__(self, array):
        self.array = array


class _Tensor:
    """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

    def __init__(self, array):
        self.array = np.ascontiguousarray(array)

    def __reduce__(self):
        a = self.array
        stride = tuple(s // a.itemsize for s in a.strides)
        return (sys.modules['torch._utils']._rebuild_tensor_v2,
                (_Storage(a.reshape(-1)), 0, a.shape, stride, False, collections.OrderedDict()))


@contextlib.contextmanager
def _torch_names():
    """Stand-in `torch` / `torch._utils` modules, so pickle can name their globals."""
    torch, utils = types.ModuleType('torch'), types.ModuleType('torch._utils')

    def _rebuild_tensor_v2(*args):
        raise AssertionError('never called while writing')

    _rebuild_tensor_v2.__module__ = 'torch._utils'
    _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ('FloatStorage', 'HalfStorage', 'LongStorage'):
        setattr(torch, name, type(name, (), {'__module__': 'torch'}))
    torch._utils = utils
    saved = {k: sys.modules.get(k) for k in ('torch', 'torch._utils')}
    sys.modules.update({'torch': torch, 'torch._utils': utils})
    try:
        yield torch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_pth(path, state, root='archive', payload=None):
    """A torch.save (zip, pickle protocol 2) file of `state` {key: numpy array}."""
    storages = []
    with _torch_names() as torch:
        storage_type = {np.dtype(np.float32): torch.FloatStorage,
                        np.dtype(np.float16): torch.HalfStorage,
                        np.dtype(np.int64): torch.LongStorage}

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _Storage):
                    storages.append(obj.array)
                    return ('storage', storage_type[obj.array.dtype], str(len(storages) - 1),
                            'cpu', obj.array.size)
                return None

        od = collections.OrderedDict((k, _Tensor(v)) for k, v in state.items())
        if payload is not None:
            od['bn1.weight'] = payload
        import io
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(od)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        zf.writestr(f'{root}/data.pkl', buf.getvalue())
        zf.writestr(f'{root}/byteorder', 'little')
        for i, array in enumerate(storages):
            zf.writestr(f'{root}/data/{i}', array.astype(array.dtype.newbyteorder('<')).tobytes())
        zf.writestr(f'{root}/version', '3\n')
    return path


def torch_state(params, units, half=()):
    """arcface_torch iresnet state dict of MXNet-named params (BN eps 2e-5 -> torch's 1e-5).

    Keys whose module name contains one of `half` are stored as float16.
    """
    names = {'conv0': 'conv1', 'bn0': 'bn1', 'relu0': 'prelu', 'bn1': 'bn2', 'pre_fc1': 'fc',
             'fc1': 'features'}
    for s, count in enumerate(units, start=1):
        for u in range(1, count + 1):
            for a, b in (('bn1', 'bn1'), ('conv1', 'conv1'), ('bn2', 'bn2'), ('relu1', 'prelu'),
                         ('conv2', 'conv2'), ('bn3', 'bn3'), ('conv1sc', 'downsample.0'),
                         ('sc', 'downsample.1')):
                names[f'stage{s}_unit{u}_{a}'] = f'layer{s}.{u - 1}.{b}'
    suffix = {'weight': 'weight', 'bias': 'bias', 'gamma': 'weight', 'beta': 'bias',
              'moving_mean': 'running_mean', 'moving_var': 'running_var'}
    state = collections.OrderedDict()
    for key, value in params.items():
        layer, _, kind = key.rpartition('_')
        if kind in ('mean', 'var'):
            layer, kind = layer[:-len('_moving')], 'moving_' + kind
        module = names[layer]
        if kind == 'moving_var':
            value = value.astype(np.float64) + 2e-5 - 1e-5
        dtype = np.float16 if any(h in module for h in half) else np.float32
        state[f'{module}.{suffix[kind]}'] = np.asarray(value).astype(dtype)
        if kind == 'moving_var':
            state[f'{module}.num_batches_tracked'] = np.array(1000, np.int64)
    return state


def params_of_state(params, state, units):
    """The MXNet-named parameters the (possibly float16-rounded) state dict really holds."""
    ref = torch_state(params, units)
    out = {}
    for key, (tkey, tvalue) in zip(params, (kv for kv in state.items()
                                                               if 'num_batches' not in kv[0])):
        assert tkey in ref
        tvalue = tvalue.astype(np.float64)
        out[key] = (tvalue - 2e-5 + 1e-5 if key.endswith('_moving_var') else tvalue)
    return {k: v.astype(np.float32) for k, v in out.items()}


@pytest.fixture
def tiny(monkeypatch):
    """The reduced-depth LResNet-IR of test_weights.py, registered for this test only."""
    monkeypatch.setitem(backbones.INSIGHT_UNITS, 'Insight_ResNetTiny', TINY_UNITS)
    return 'Insight_ResNetTiny'


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope='module')
def r18(tmp_path_factory):
    """A random iresnet18 at 112x112 as backbone.pth (convs float16) and its ONNX reference."""
    tmp = tmp_path_factory.mktemp('r18')
    params = source_params(R18, 7, seed=21, fc1_gamma_random=False)
    state = torch_state(params, R18, half=('conv', 'downsample.0', 'fc'))
    params = params_of_state(params, state, R18)  # what the float16 file holds, exactly
    pth = write_pth(str(tmp / 'backbone.pth'), state, root='backbone')
    reference = make_onnx(params, R18, 7, 'pytorch', str(tmp / 'reference.onnx'))
    return {'params': params, 'pth': pth, 'reference': reference, 'tmp': tmp}


# ---------------------------------------------------------------------------------------------
# .pth


def test_pth_iresnet18_matches_onnxruntime_on_faces(r18, tmp_path):
    start = time.perf_counter()
    weights, summary = pth_to_npy(r18['pth'])
    seconds = time.perf_counter() - start
    assert summary['backbone'] == 'Insight_ResNet18' and summary['units'] == R18
    assert summary['layers'] == 62 and abs(summary['conv0_scale'] - 128 / 127.5) < 1e-12
    model = keras_from_npy(weights, 'Insight_ResNet18', tmp_path, 112)
    faces = sample_faces(112)
    ours = model(faces.astype(np.float32) / 255.0, training=False).numpy()
    ref, _ = onnx_embeddings(r18['reference'], faces, TORCH_FEED)
    cos = cosine(ours, ref)
    print(f'\n.pth iresnet18 (float16 convs) vs onnxruntime on {len(faces)} faces: min cosine '
          f'{cos.min():.8f}, max |diff| {np.abs(ours - ref).max():.2e}; reading and mapping '
          f'{seconds:.2f} s')
    assert cos.min() > 0.99999
    assert ort.get_device() == 'CPU'


def test_pth_variants_and_refusals(tmp_path, tiny):
    params = source_params(TINY_UNITS, 3, seed=5, fc1_gamma_random=False)
    state = torch_state(params, TINY_UNITS)
    plain, _ = pth_to_npy(write_pth(str(tmp_path / 'plain.pth'), state))
    # nn.DataParallel's 'module.' prefix.
    wrapped = collections.OrderedDict(('module.' + k, v) for k, v in state.items())
    dp, summary = pth_to_npy(write_pth(str(tmp_path / 'dp.pth'), wrapped))
    assert summary['backbone'] == tiny
    for name in plain:
        if name != '__meta__':
            for a, b in zip(plain[name], dp[name]):
                np.testing.assert_array_equal(a, b)
    # A hostile pickle inside a valid zip is refused before it runs.
    marker = str(tmp_path / 'PWNED')
    hostile = write_pth(str(tmp_path / 'hostile.pth'), state, payload=_Payload(marker))
    with pytest.raises(UserError, match='refused global posix.mkdir|refused global os.mkdir'):
        pth_to_npy(hostile)
    assert not os.path.exists(marker)
    cases = {
        'legacy': (b'\x80\x02' + pickle.dumps({'a': 1}, protocol=2), 'legacy .torch < 1.6'),
        'junk': (b'PK not really a zip', 'not a torch.save zip'),
    }
    for name, (data, pattern) in cases.items():
        path = tmp_path / f'{name}.pth'
        path.write_bytes(data)
        with pytest.raises(UserError, match=pattern):
            pth_to_npy(str(path))
    # A storage missing from the zip, one cut short, an unknown tensor, a training checkpoint.
    src = write_pth(str(tmp_path / 'src.pth'), state)
    with zipfile.ZipFile(src) as zin:
        entries = {n: zin.read(n) for n in zin.namelist()}
    for name, edit, pattern in (
            ('missing', lambda e: e.pop('archive/data/3'), r'storage archive/data/3 is missing'),
            ('short', lambda e: e.update({'archive/data/0': e['archive/data/0'][:-4]}),
             r'archive/data/0 has 6908 bytes, expected 1728 x 4')):
        changed = dict(entries)
        edit(changed)
        with zipfile.ZipFile(tmp_path / f'{name}.pth', 'w') as zout:
            for n, data in changed.items():
                zout.writestr(n, data)
        with pytest.raises(UserError, match=pattern):
            pth_to_npy(str(tmp_path / f'{name}.pth'))
    extra = collections.OrderedDict(state, **{'head.weight': np.zeros((10, 512), np.float32)})
    with pytest.raises(UserError, match='not part of an iresnet: head.weight'):
        pth_to_npy(write_pth(str(tmp_path / 'extra.pth'), extra))
    bad = collections.OrderedDict(state)
    bad['layer2.1.prelu.weight'] = np.zeros(64, np.float32)
    with pytest.raises(UserError, match=r"'stage2_unit2_relu1' \(source 'layer2.1.prelu'\): "
                                        r"tensor 'layer2.1.prelu.weight' is declared \(64,\), "
                                        r'expected \(128,\)'):
        pth_to_npy(write_pth(str(tmp_path / 'bad.pth'), bad))


def test_every_depth_is_recognised(tmp_path):
    """State dicts with every depth's keys (one-value tensors: only the key layout matters)."""
    one = np.zeros(1, np.float32)
    for name, units in INSIGHT_UNITS.items():
        keys = ['conv1.weight', 'prelu.weight', 'fc.weight', 'fc.bias']
        for s, count in enumerate(units, start=1):
            keys += [f'layer{s}.{i}.conv1.weight' for i in range(count)]
        path = write_pth(str(tmp_path / f'{name}.pth'), {k: one for k in keys})
        # Past depth inference, the first lookup fails: the depth was recognised.
        with pytest.raises(UserError, match="missing tensor 'bn1.weight'"):
            pth_to_npy(path)
        with pytest.raises(UserError, match=re.escape(f'has {list(units)} units per stage, but')):
            pth_to_npy(path, backbone='Insight_ResNet100' if units != (3, 13, 30, 3)
                       else 'Insight_ResNet50')
    keys = ['conv1.weight'] + [f'layer{s}.{i}.conv1.weight' for s in (1, 2, 3, 4)
                               for i in range(3)]
    with pytest.raises(UserError, match=r'unsupported depth: \[3, 3, 3, 3\]'):
        pth_to_npy(write_pth(str(tmp_path / 'odd.pth'), {k: one for k in keys}))


# ---------------------------------------------------------------------------------------------
# ONNX as torch.onnx.export writes it today, and the checks that keep unrunnable graphs out.


def test_dynamo_onnx_iresnet18_and_cli(r18, tmp_path):
    path = make_onnx(r18['params'], R18, 7, 'dynamo', str(tmp_path / 'r18.onnx'), opset=18)
    assert os.path.getsize(path + '.data') > 40e6 > os.path.getsize(path)
    weights, summary = onnx_to_npy(path)
    assert summary['backbone'] == 'Insight_ResNet18' and summary['opset'] == 18
    npy = str(tmp_path / 'r18.npy')
    write_weight_dict(weights, npy)
    start = time.perf_counter()
    gap, batch = verify_onnx(path, npy, 'Insight_ResNet18', summary['feed'],
                             summary['fixed_batch'])
    print(f'\ndynamo ONNX iresnet18 (opset 18, external data, Reshape, BN in Gemm) vs '
          f'onnxruntime: worst 1 - cos {gap.max():.1e} on {len(gap)} faces, batch {batch}; '
          f'conversion {summary["seconds"]:.2f} s, verification '
          f'{time.perf_counter() - start:.2f} s')
    assert gap.max() < 1e-9 and MAX_ONE_MINUS_COS == 1e-6 and batch == 1
    # Without its .data file the model is refused by name.
    alone = tmp_path / 'alone'
    alone.mkdir()
    shutil.copy(path, alone / 'r18.onnx')
    with pytest.raises(UserError, match=r"stored in .*alone/r18.onnx.data, which does not exist"):
        onnx_to_npy(str(alone / 'r18.onnx'))
    script = os.path.join(ROOT, 'pre_models', 'convert_insightface.py')
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    runs = {}
    for source, extra in ((r18['pth'], []), (path, ['--verify'])):
        out = str(tmp_path / (os.path.basename(source) + '.npy'))
        done = subprocess.run([sys.executable, script, f'--input={source}', f'--output={out}',
                               *extra], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        runs[source] = done.stdout
        print(done.stdout)
    assert 'Insight_ResNet18' in runs[r18['pth']]
    assert all('TensorFlow not imported' in out for out in runs.values())
    found = re.search(r'verify: +1 - cos to onnxruntime on 6 sample faces: worst ([0-9.e+-]+) '
                      r'\(limit 1e-06\).*onnxruntime ran one image at a time', runs[path])
    assert found and float(found.group(1)) < 1e-9
    bad = subprocess.run([sys.executable, script, f'--input={r18["pth"]}', '--verify',
                          f'--output={tmp_path}/v.npy'], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and 'needs an ONNX --input' in bad.stderr


@pytest.mark.parametrize('opset', [11, 18])
def test_onnx_opsets_and_export_styles_tiny(tmp_path, tiny, opset):
    params = source_params(TINY_UNITS, 3, seed=31 + opset, fc1_gamma_random=True)
    faces = sample_faces(SMALL)
    for style in ('pytorch', 'dynamo'):
        path = make_onnx(params, TINY_UNITS, 3, style, str(tmp_path / f'{style}.onnx'),
                         opset=opset)
        weights, summary = onnx_to_npy(path)
        assert summary['opset'] == opset
        model = keras_from_npy(weights, tiny, tmp_path)
        ours = model(faces.astype(np.float32) / 255.0, training=False).numpy()
        cos = cosine(ours, onnx_embeddings(path, faces, TORCH_FEED)[0])
        assert cos.min() > 0.99999, (style, cos)


def test_unrunnable_graphs_are_refused_with_the_node(tmp_path, tiny):
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
    assert verify_onnx(dyn, right, tiny, TORCH_FEED)[0].max() < 1e-9
    with pytest.raises(UserError, match=r'disagrees with .*dyn.onnx: 1 - cos = [0-9.e+-]+ on '
                                        r'sample face \d of 6 \(limit 1e-06\)'):
        verify_onnx(dyn, wrong, tiny, TORCH_FEED)
    model = onnx.load(dyn)
    for init in model.graph.initializer:
        if init.name == 'flat':
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([1, 512, 9], np.int64), 'flat'))
    onnx.save(model, tmp_path / 'reshape.onnx')
    with pytest.raises(UserError, match=r"Reshape 'Reshape_\d+' to \[1, 512, 9\] is not a flatten"):
        onnx_to_npy(str(tmp_path / 'reshape.onnx'))


# ---------------------------------------------------------------------------------------------
# The whole family.


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
