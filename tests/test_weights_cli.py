"""pre_models/convert_insightface.py in a fresh process: the conversion and its report, exit 2 with
one line and nothing written on refusal, --verify end to end (iresnet18 from .pth and from a dynamo
ONNX export; a graph whose batch is fixed to 1 while declared dynamic), and 112x112 inputs
reproducing the source embedding.
"""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

from modules import backbones
from modules.utils import UserError
from modules.weights import (
    convert_checkpoint,
    format_summary,
    load_npy_weights,
    onnx_to_npy,
    read_weight_dict,
    write_weight_dict,
)
from modules.weights.verify import MAX_ONE_MINUS_COS, verify_onnx
from tests.helpers.iresnet import (
    R18,
    ROOT,
    SMALL,
    agreement,
    build,
    convert_cli,
    images,
    source_params,
)
from tests.helpers.onnx_graphs import declare_input, make_onnx, run_onnx
from tests.helpers.pth_files import iresnet18_pth


@pytest.fixture(scope='module')
def r18(tmp_path_factory):
    """A random iresnet18 at 112x112 as backbone.pth (convs float16) and its parameters."""
    tmp = tmp_path_factory.mktemp('r18')
    params, pth = iresnet18_pth(tmp)
    return {'params': params, 'pth': pth, 'tmp': tmp}


@pytest.fixture(scope='module')
def r18_small(tmp_path_factory):
    """A random iresnet18 for 33x33 inputs (3x3 maps before the FC): its dynamo export with the
    batch fixed to 1 by the Reshape but declared dynamic, as torch2onnx.py leaves it."""
    tmp = tmp_path_factory.mktemp('r18_small')
    params = source_params(R18, 3, seed=71, fc1_gamma_random=False)
    dynamo = make_onnx(params, R18, 3, 'dynamo', str(tmp / 'r18.onnx'), opset=18)
    return {'params': params, 'tmp': tmp, 'dynamo': dynamo,
            'fixed': declare_input(dynamo, str(tmp / 'r18_fixed.onnx'))}


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
