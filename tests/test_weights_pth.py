"""arcface_torch .pth state dicts (torch.save zips written without PyTorch): iresnet18 with float16
convs compared with onnxruntime on the project's face photos, DataParallel prefixes, every depth
recognised, and refusals: hostile pickles, NaN/Inf weights (also in ONNX initializers), hostile
sizes refused before allocating (also ONNX initializers and external data), truncated or damaged
zips, torchvision ResNets.
"""
import collections
import os
import pickle
import re
import subprocess
import sys
import time
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modules.config import INSIGHT_UNITS
from modules.utils import UserError
from modules.weights import onnx_to_npy
from modules.weights.torch_pth import pth_to_npy
from modules.weights.verify import onnx_embeddings, sample_faces
from tests.helpers.iresnet import (
    R18,
    ROOT,
    TINY_UNITS,
    convert_cli,
    cosine,
    keras_from_npy,
    source_params,
)
from tests.helpers.onnx_graphs import TORCH_FEED, make_onnx
from tests.helpers.pickles import Payload
from tests.helpers.pth_files import (
    RawStorage,
    RawTensor,
    iresnet18_pth,
    torch_state,
    write_pth,
    write_raw_pth,
)


@pytest.fixture(scope='module')
def r18(tmp_path_factory):
    """A random iresnet18 at 112x112 as backbone.pth (convs float16) and its ONNX reference."""
    tmp = tmp_path_factory.mktemp('r18')
    params, pth = iresnet18_pth(tmp)
    reference = make_onnx(params, R18, 7, 'pytorch', str(tmp / 'reference.onnx'))
    return {'params': params, 'pth': pth, 'reference': reference, 'tmp': tmp}


@pytest.fixture(scope='module')
def r18_small_params():
    """Random iresnet18 parameters for 33x33 inputs (3x3 maps before the FC)."""
    return source_params(R18, 3, seed=71, fc1_gamma_random=False)


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


def test_pth_variants_and_refusals(tmp_path, tiny_iresnet):
    params = source_params(TINY_UNITS, 3, seed=5, fc1_gamma_random=False)
    state = torch_state(params, TINY_UNITS)
    plain, _ = pth_to_npy(write_pth(str(tmp_path / 'plain.pth'), state))
    # nn.DataParallel's 'module.' prefix.
    wrapped = collections.OrderedDict(('module.' + k, v) for k, v in state.items())
    dp, summary = pth_to_npy(write_pth(str(tmp_path / 'dp.pth'), wrapped))
    assert summary['backbone'] == tiny_iresnet
    for name in plain:
        if name != '__meta__':
            for a, b in zip(plain[name], dp[name]):
                np.testing.assert_array_equal(a, b)
    # A hostile pickle inside a valid zip is refused before it runs.
    marker = str(tmp_path / 'PWNED')
    hostile = write_pth(str(tmp_path / 'hostile.pth'), state, payload=Payload(marker))
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
# Non-finite weights.


def test_nan_and_inf_weights_are_refused_naming_the_tensor(r18_small_params, tmp_path, tiny_iresnet):
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
    r18_state = torch_state(r18_small_params, R18)
    r18_state['fc.weight'][0, 0] = np.nan
    out = str(tmp_path / 'out.npy')
    done = convert_cli(write_pth(str(tmp_path / 'r18_nan.pth'), r18_state), out)
    print('\n' + done.stderr)
    assert done.returncode == 2 and "tensor 'fc.weight' holds 1 NaN" in done.stderr
    assert done.stderr.count('\n') == 1 and not os.path.exists(out)


# ---------------------------------------------------------------------------------------------
# Hostile sizes: refused before allocating, peak memory measured.


def hostile_files(tmp):
    """{name: (path, the message expected)} of small files declaring huge tensors."""
    out = {}
    big = (16384, 16384)
    one = RawStorage('<f4', 1)
    out['stride0'] = (write_raw_pth(f'{tmp}/stride0.pth', {'conv1.weight': RawTensor(
        one, 0, big, (0, 0))}, {0: b'\0' * 4}),
        r'a tensor of shape \(16384, 16384\) \(stride \(0, 0\), offset 0\) does not fit its '
        r"storage '0' of 1 elements")
    huge = RawStorage('<f4', 16384 * 16384)
    out['numel'] = (write_raw_pth(f'{tmp}/numel.pth', {'conv1.weight': RawTensor(
        huge, 0, big, (16384, 1))}, {0: b'\0' * 4}),
        r'storage archive/data/0 has 4 bytes, expected 268435456 x 4')
    # A 512 MiB storage behind a 64-value tensor, in a deflated entry of 0.5 MiB (a zip bomb).
    keys = {'prelu.weight': (64,), **{f'layer{s}.0.conv1.weight': (1,) for s in (1, 2, 3, 4)}}
    tensors = {k: RawTensor(RawStorage('<f4', 1), 0, size, (1,) * len(size))
               for k, size in keys.items()}
    tensors['prelu.weight'] = RawTensor(RawStorage('<f4', 2**27), 0, (64,), (1,))
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
# Messages: damaged files, foreign architectures.


def test_truncated_and_damaged_pth_say_so(tmp_path, tiny_iresnet):
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
