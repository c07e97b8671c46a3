"""Weights round 3 (issue 20): newer ONNX opsets judged by their ops, --verify on fixed-batch
graphs with a 1 - cos <= 1e-6 rule, non-finite weights, hostile sizes and the messages for
damaged or foreign files.

Every file is written here: ONNX graphs by test_weights.make_onnx, torch.save zips by the writer of
test_weights_sources (no PyTorch), hostile variants by editing those or by the small raw writer
below, which declares any storage and tensor geometry it is asked to.
"""
import collections
import io
import os
import pickle
import re
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_weights import ROOT, SMALL, TINY_UNITS, make_onnx, source_params
from test_weights_sources import TORCH_FEED, _torch_names, torch_state, write_pth

from modules import backbones
from modules.config import INSIGHT_UNITS
from modules.utils import UserError
from modules.weights import onnx_to_npy, write_weight_dict
from modules.weights.torch_pth import pth_to_npy
from modules.weights.verify import MAX_ONE_MINUS_COS, onnx_embeddings, verify_onnx

R18 = INSIGHT_UNITS['Insight_ResNet18']
SCRIPT = os.path.join(ROOT, 'pre_models', 'convert_insightface.py')
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')


@pytest.fixture
def tiny(monkeypatch):
    """The reduced-depth LResNet-IR of test_weights.py, registered for this test only."""
    monkeypatch.setitem(backbones.INSIGHT_UNITS, 'Insight_ResNetTiny', TINY_UNITS)
    return 'Insight_ResNetTiny'


def convert_cli(source, output, *extra):
    """Run the converter script in a fresh process."""
    return subprocess.run([sys.executable, SCRIPT, f'--input={source}', f'--output={output}',
                           *extra], capture_output=True, text=True, env=ENV, timeout=300)


def relabel(src, dst, opset, ir_version=10):
    """Copy an ONNX model (its external data file stays shared) with another default opset."""
    model = onnx.load(src, load_external_data=False)
    model.opset_import[0].version = opset
    model.ir_version = ir_version
    onnx.save(model, dst)
    return dst


def declare_input(src, dst, side=SMALL):
    """A copy of an ONNX model whose input (and output) batch is declared dynamic ('None', what
    arcface_torch's torch2onnx.py writes over a dynamo export, whose Reshape still fixes the batch
    to 1) and whose input is declared side x side."""
    model = onnx.load(src, load_external_data=False)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = 'None'
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = side
    onnx.save(model, dst)
    return dst


def npy_bytes(weights, path):
    write_weight_dict(weights, str(path))
    return open(path, 'rb').read()


# ---------------------------------------------------------------------------------------------
# 1. Opsets: the ops present decide, not the version number.


def test_opsets_18_to_28_convert_identically_and_unknown_ops_are_named(tmp_path, tiny):
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
# 2 and 3. --verify: whatever batch the graph runs, 1 - cos <= 1e-6 on every face.


@pytest.fixture(scope='module')
def r18_small(tmp_path_factory):
    """A random iresnet18 for 33x33 inputs (3x3 maps before the FC): its dynamo export with the
    batch fixed to 1 by the Reshape but declared dynamic, as torch2onnx.py leaves it."""
    tmp = tmp_path_factory.mktemp('r18_small')
    params = source_params(R18, 3, seed=71, fc1_gamma_random=False)
    dynamo = make_onnx(params, R18, 3, 'dynamo', str(tmp / 'r18.onnx'), opset=18)
    return {'params': params, 'tmp': tmp, 'dynamo': dynamo,
            'fixed': declare_input(dynamo, str(tmp / 'r18_fixed.onnx'))}


def test_fixed_batch_graph_under_verify(r18_small, tmp_path):
    fixed = r18_small['fixed']
    inp = ort.InferenceSession(fixed, providers=['CPUExecutionProvider']).get_inputs()[0]
    assert inp.shape[0] == 'None'  # declared dynamic ...
    with pytest.raises(Exception, match='Reshape'):  # ... yet fixed to 1 inside: a batch fails
        ort.InferenceSession(fixed, providers=['CPUExecutionProvider']).run(
            None, {inp.name: np.zeros((6, 3, SMALL, SMALL), np.float32)})
    out = str(tmp_path / 'out' / 'r18.npy')
    done = convert_cli(fixed, out, '--verify')
    print('\n' + done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr
    line = [ln for ln in done.stdout.splitlines() if ln.startswith('verify:')][0]
    worst = float(line.split('worst ')[1].split()[0])
    assert 'on 6 sample faces' in line and 'onnxruntime ran one image at a time' in line
    assert worst <= 1e-9 and '(limit 1e-06)' in line
    assert os.listdir(tmp_path / 'out') == ['r18.npy']
    # The same graph declaring 64x64 inputs: its fc no longer fits, onnxruntime fails at run
    # time (before: a traceback, exit 1, the .npy left behind).
    bad_out = str(tmp_path / 'bad' / 'r18.npy')
    done = convert_cli(declare_input(fixed, os.path.join(r18_small['tmp'], 'r18_64.onnx'), 64),
                       bad_out, '--verify')
    print(done.stderr)
    assert done.returncode == 2
    assert done.stderr.count('\n') == 1 and done.stderr.startswith('error: ')
    assert 'onnxruntime cannot run it on a batch of 1 image(s) of shape [3, 64, 64]' in done.stderr
    assert f'({bad_out} not written)' in done.stderr
    assert os.listdir(tmp_path / 'bad') == []  # nothing left behind, no staged file either


def test_verify_catches_input_scale_and_bn_epsilon_errors(tmp_path, tiny):
    """Errors the old rule (cosine >= 0.9999) let through: the /127.5 vs /128 input scale, and an
    uncorrected BN epsilon (1e-5 vs our 2e-5) in a network with small running variances (the
    size of the effect grows as the variances shrink)."""
    params = source_params(TINY_UNITS, 3, seed=85, fc1_gamma_random=False)
    src = declare_input(make_onnx(params, TINY_UNITS, 3, 'pytorch', str(tmp_path / 'p.onnx')),
                        str(tmp_path / 'm.onnx'))
    right, scaled = str(tmp_path / 'right.npy'), str(tmp_path / 'scaled.npy')
    write_weight_dict(onnx_to_npy(src)[0], right)
    write_weight_dict(onnx_to_npy(src, assume_norm=(127.5, 128.0))[0], scaled)
    gap, batch = verify_onnx(src, right, tiny, TORCH_FEED)
    assert gap.max() < 1e-9 and batch == 6  # a dynamic batch: all six faces in one run
    with pytest.raises(UserError) as scale_err:
        verify_onnx(src, scaled, tiny, TORCH_FEED)
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
    assert verify_onnx(mx, right, tiny, None)[0].max() < 1e-9
    with pytest.raises(UserError) as eps_err:
        verify_onnx(mx, eps_npy, tiny, None)
    for err in (scale_err, eps_err):
        message = str(err.value)
        print('\n' + message)
        value = float(message.split('1 - cos = ')[1].split()[0])
        assert MAX_ONE_MINUS_COS == 1e-6 < value < 1e-4  # cosine > 0.9999: passed the old rule
        assert 'on sample face' in message and 'of 6 (limit 1e-06)' in message


# ---------------------------------------------------------------------------------------------
# 4. Non-finite weights.


def test_nan_and_inf_weights_are_refused_naming_the_tensor(r18_small, tmp_path, tiny):
    state = torch_state(source_params(TINY_UNITS, 3, seed=91, fc1_gamma_random=False),
                        TINY_UNITS, half=('layer3',))
    state['layer2.1.conv2.weight'][5, 7, 1, 2] = np.nan
    with pytest.raises(UserError, match=r"tensor 'layer2.1.conv2.weight' holds 1 NaN or infinite "
                                        r'value\(s\) \(the first at index \(5, 7, 1, 2\): nan\)'):
        pth_to_npy(write_pth(str(tmp_path / 'nan.pth'), state))
    state['layer2.1.conv2.weight'][5, 7, 1, 2] = 0
    state['layer3.0.bn1.running_var'][[3, 9]] = np.inf  # float16 storage
    with pytest.raises(UserError, match=r"tensor 'layer3.0.bn1.running_var' holds 2 NaN or "
                                        r'infinite value\(s\) \(the first at index \(3,\): inf\)'):
        pth_to_npy(write_pth(str(tmp_path / 'inf.pth'), state))
    # ONNX (and MXNet) sources: the layer and the source node are named.
    model = onnx.load(make_onnx(source_params(TINY_UNITS, 3, seed=92), TINY_UNITS, 3, 'pytorch',
                                str(tmp_path / 'ok.onnx')))
    init = [i for i in model.graph.initializer if i.name == 'stage3_unit1_bn1.m'][0]
    values = numpy_helper.to_array(init).copy()
    values[4] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, tmp_path / 'nan.onnx')
    with pytest.raises(UserError, match=r"layer 'stage3_unit1_bn1' \(source "
                                        r"'BatchNormalization_\d+'\): mean holds 1 NaN"):
        onnx_to_npy(str(tmp_path / 'nan.onnx'))
    # The script: exit 2, one line, no .npy.
    r18_state = torch_state(r18_small['params'], R18)
    r18_state['fc.weight'][0, 0] = np.nan
    out = str(tmp_path / 'out.npy')
    done = convert_cli(write_pth(str(tmp_path / 'r18_nan.pth'), r18_state), out)
    print('\n' + done.stderr)
    assert done.returncode == 2 and "tensor 'fc.weight' holds 1 NaN" in done.stderr
    assert done.stderr.count('\n') == 1 and not os.path.exists(out)


# ---------------------------------------------------------------------------------------------
# 5. Hostile sizes: refused before allocating, peak memory measured.


class _RawStorage:
    def __init__(self, dtype, numel):
        self.dtype, self.numel = np.dtype(dtype), numel


class _RawTensor:
    """Pickles as _rebuild_tensor_v2(storage, offset, size, stride, ...) with any geometry."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return sys.modules['torch._utils']._rebuild_tensor_v2, self.args


def write_raw_pth(path, tensors, entries):
    """A torch.save zip whose data.pkl declares `tensors` {key: _RawTensor}, and whose storage
    entries hold `entries` {storage index: bytes} whatever the storages declare."""
    storages = []
    with _torch_names() as torch:
        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _RawStorage):
                    if obj not in storages:
                        storages.append(obj)
                    return ('storage', torch.FloatStorage, str(storages.index(obj)), 'cpu',
                            obj.numel)
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(collections.OrderedDict(tensors))
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        zf.writestr('archive/data.pkl', buf.getvalue())
        zf.writestr('archive/byteorder', 'little')
        for index, data in entries.items():
            zf.writestr(f'archive/data/{index}', data)
    return path


def hostile_files(tmp):
    """{name: (path, the message expected)} of small files declaring huge tensors."""
    out = {}
    big = (16384, 16384)
    one = _RawStorage('<f4', 1)
    out['stride0'] = (write_raw_pth(f'{tmp}/stride0.pth', {'conv1.weight': _RawTensor(
        one, 0, big, (0, 0))}, {0: b'\0' * 4}),
        r'a tensor of shape \(16384, 16384\) \(stride \(0, 0\), offset 0\) does not fit its '
        r"storage '0' of 1 elements")
    huge = _RawStorage('<f4', 16384 * 16384)
    out['numel'] = (write_raw_pth(f'{tmp}/numel.pth', {'conv1.weight': _RawTensor(
        huge, 0, big, (16384, 1))}, {0: b'\0' * 4}),
        r'storage archive/data/0 has 4 bytes, expected 268435456 x 4')
    # A 512 MiB storage behind a 64-value tensor, in a deflated entry of 0.5 MiB (a zip bomb).
    keys = {'prelu.weight': (64,), **{f'layer{s}.0.conv1.weight': (1,) for s in (1, 2, 3, 4)}}
    tensors = {k: _RawTensor(_RawStorage('<f4', 1), 0, size, (1,) * len(size))
               for k, size in keys.items()}
    tensors['prelu.weight'] = _RawTensor(_RawStorage('<f4', 2**27), 0, (64,), (1,))
    path = write_raw_pth(f'{tmp}/bomb.pth', tensors, {i: b'\0' * 4 for i in range(1, 5)})
    with zipfile.ZipFile(path, 'a', zipfile.ZIP_DEFLATED) as zf:
        with zf.open('archive/data/0', 'w') as fh:
            chunk = b'\0' * 2**24
            for _ in range(2**29 // len(chunk)):
                fh.write(chunk)
    out['deflated'] = (path, r'storage data/0 holds 134217728 elements, but its tensors use only '
                             '64')
    # ONNX: an initializer declaring 16384 x 16384 floats with 4 bytes inline, and one whose
    # external data lies past the end of its file.
    node = helper.make_node('Conv', ['input', 'w'], ['y'], name='conv0')
    w = TensorProto(name='w', data_type=TensorProto.FLOAT, dims=big, raw_data=b'\0' * 4)
    graph = helper.make_graph([node], 'g', [helper.make_tensor_value_info(
        'input', TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            'y', TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(graph), f'{tmp}/inline.onnx')
    out['inline'] = (f'{tmp}/inline.onnx',
                     r"initializer 'w' declares shape \[16384, 16384\] \(1073741824 bytes\) but "
                     'holds 4 bytes')
    w = TensorProto(name='w', data_type=TensorProto.FLOAT, dims=big,
                    data_location=TensorProto.EXTERNAL)
    for key, value in (('location', 'ext.data'), ('offset', '0'), ('length', str(2**32))):
        w.external_data.add(key=key, value=value)
    graph.initializer[0].CopyFrom(w)
    with open(f'{tmp}/external.onnx', 'wb') as fh:  # as it is: no onnx.save rewriting the data
        fh.write(helper.make_model(graph).SerializeToString())
    with open(f'{tmp}/ext.data', 'wb') as fh:
        fh.write(b'\0' * 64)
    out['external'] = (f'{tmp}/external.onnx',
                       r"initializer 'w' declares shape \[16384, 16384\] \(1073741824 bytes\), but "
                       r'its external data is 4294967296 bytes at offset 0 of .*ext.data, a file '
                       'of 64 bytes')
    return out


WORKER = """
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
from modules.utils import UserError
from modules.weights.onnx import onnx_to_npy
from modules.weights.torch_pth import pth_to_npy
for path in sys.argv[1:]:
    start = time.perf_counter()
    if path == 'control':  # what a 1 GB allocation looks like to the same measurement
        print(f'control: {{np.ones(2**28, np.float32).sum():.0f}} ones')
        continue
    try:
        (onnx_to_npy if path.endswith('.onnx') else pth_to_npy)(path)
        print('CONVERTED', path)
    except UserError as err:
        print(f'{{time.perf_counter() - start:.3f}} s: {{err}}')
"""
# The worker's peak is read by a small launcher as RUSAGE_CHILDREN: a process started straight
# from pytest would report pytest's own resident size, which Linux carries over exec into
# ru_maxrss.
LAUNCHER = """
import resource, subprocess, sys
done = subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]])
print('peak MiB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, flush=True)
sys.exit(done.returncode)
"""


def peak_run(*args):
    """(stdout lines, peak resident MiB) of the worker converting `args`."""
    done = subprocess.run([sys.executable, '-c', LAUNCHER, WORKER.format(root=ROOT), *args],
                          capture_output=True, text=True, timeout=120)
    print('\n' + done.stdout + done.stderr)
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    return lines[:-1], float(lines[-1].split()[-1])


def test_hostile_sizes_are_refused_before_allocation(tmp_path):
    files = hostile_files(tmp_path)
    assert max(os.path.getsize(p) for p, _ in files.values()) < 2**20  # small files
    lines, peak = peak_run(*(p for p, _ in files.values()))
    assert len(lines) == len(files)
    for line, (name, (_, pattern)) in zip(lines, files.items()):
        assert re.search(pattern, line), (name, line)
    assert peak < 300, peak
    _, control = peak_run('control')
    assert control > 1000, control  # the measurement sees a 1 GiB array


# ---------------------------------------------------------------------------------------------
# 6. Messages: damaged files, foreign architectures.


def test_truncated_and_damaged_pth_say_so(tmp_path, tiny):
    state = torch_state(source_params(TINY_UNITS, 3, seed=3, fc1_gamma_random=False), TINY_UNITS)
    data = open(write_pth(str(tmp_path / 'ok.pth'), state), 'rb').read()
    for name, cut in (('half', data[:len(data) // 2]), ('tail', data[:-10])):
        (tmp_path / f'{name}.pth').write_bytes(cut)
        with pytest.raises(UserError, match=rf'{name}.pth: truncated or damaged: it starts as a '
                                            r'torch.save zip file but its zip directory, written '
                                            rf'last, is missing or broken \({len(cut)} bytes\)'):
            pth_to_npy(str(tmp_path / f'{name}.pth'))
    # A byte flipped inside a storage: the zip's CRC catches it.
    with zipfile.ZipFile(tmp_path / 'ok.pth') as zf:
        info = zf.getinfo('archive/data/0')  # conv1.weight
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + 3
    flipped = bytearray(data)
    flipped[at] ^= 0xFF
    (tmp_path / 'flipped.pth').write_bytes(bytes(flipped))
    with pytest.raises(UserError, match=r'flipped.pth: truncated or damaged: zip entry '
                                        r'archive/data/0 cannot be read \(Bad CRC-32'):
        pth_to_npy(str(tmp_path / 'flipped.pth'))
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(UserError, match=r'empty.pth: empty file \(0 bytes\)'):
        pth_to_npy(str(tmp_path / 'empty.pth'))


def torchvision_resnet_state(units, bottleneck, classes=1000):
    """The keys of torchvision's ResNet (one-value tensors but the classifier's real shape)."""
    one = np.zeros(1, np.float32)
    bn = ('weight', 'bias', 'running_mean', 'running_var')
    keys = ['conv1.weight'] + [f'bn1.{p}' for p in bn]
    convs = ('conv1', 'conv2', 'conv3') if bottleneck else ('conv1', 'conv2')
    for s, count in enumerate(units, start=1):
        for i in range(count):
            for c in convs:
                keys += [f'layer{s}.{i}.{c}.weight'] + [f'layer{s}.{i}.bn{c[-1]}.{p}' for p in bn]
            if i == 0 and (s > 1 or bottleneck):
                keys += [f'layer{s}.0.downsample.0.weight'] + [
                    f'layer{s}.0.downsample.1.{p}' for p in bn]
    state = {k: one for k in keys}
    state['fc.weight'] = np.zeros((classes, 2048 if bottleneck else 512), np.float32)
    state['fc.bias'] = np.zeros(classes, np.float32)
    return state


def test_torchvision_resnet_is_named(tmp_path):
    for depth, units, bottleneck in ((18, (2, 2, 2, 2), False), (34, (3, 4, 6, 3), False),
                                     (50, (3, 4, 6, 3), True)):
        path = write_pth(str(tmp_path / f'resnet{depth}.pth'),
                         torchvision_resnet_state(units, bottleneck))
        with pytest.raises(UserError) as err:
            pth_to_npy(path)
        message = str(err.value)
        print('\n' + message)
        block = 'Bottleneck' if bottleneck else 'BasicBlock'
        assert f'this looks like a torchvision-style ResNet-{depth} ({block} blocks' in message
        assert f'units per stage {list(units)}' in message
        assert f'a 1000-way fc classifier on {2048 if bottleneck else 512} features' in message
        assert 'not an arcface_torch iresnet: the converter reads iresnet18/34/50/100/200' in message
        assert 'prelu.weight' not in message.split('keys')[0]  # no more "missing 'prelu.weight'"

