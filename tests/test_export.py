"""Exported hashing / embedding models: signature, dynamic batch, parity with Keras, CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest

from modules.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    from modules.config import STAGE2_REQUIRED, load_config
    from modules.deploy.export import parity_images
    from modules.models import load_iom_model
    from tests.helpers.tiny_iom import make_tiny_model
    work = tmp_path_factory.mktemp('export')
    cfg_path = make_tiny_model(str(work), perm_key=1234)
    here = os.getcwd()
    os.chdir(work)
    try:
        model = load_iom_model(load_config(cfg_path, STAGE2_REQUIRED), verbose=False)
    finally:
        os.chdir(here)
    return work, cfg_path, model, parity_images(112)


@pytest.mark.parametrize('fmt', ['saved_model', 'tflite', 'onnx'])
def test_code_export_matches_keras_with_a_dynamic_batch(tiny, fmt):
    from modules.deploy.export import export_model, run_export
    work, _, model, images = tiny
    output = str(work / f'iom.{fmt}')
    result = export_model(model, 112, fmt, output, images=images)
    assert result['n'] == len(images) >= 64 + 3
    assert result['agreement'] >= (1.0 if fmt == 'saved_model' else 0.999) and result['ok']
    for batch in (images[:1], images[5:12]):
        codes = run_export(fmt, output, batch)
        assert codes.dtype == np.int32 and codes.shape == (len(batch), 32)
        np.testing.assert_array_equal(codes, model(batch.astype(np.float32) / 255.0).numpy())
    assert not [name for name in os.listdir(work) if name.startswith('.iom')]  # no stage left


def test_embedding_export(tiny):
    from modules.deploy.export import export_model, run_export
    work, _, model, images = tiny
    result = export_model(model, 112, 'saved_model', str(work / 'embd'), embedding=True,
                          images=images)
    assert result['ok'] and result['agreement'] > 1 - 1e-4
    embeddings = run_export('saved_model', str(work / 'embd'), images[:4])
    assert embeddings.dtype == np.float32 and embeddings.shape == (4, 64)


def test_failed_parity_writes_nothing(tiny, monkeypatch):
    from modules.deploy import export
    work, _, model, images = tiny
    (work / 'old').mkdir()
    monkeypatch.setattr(export, 'write_export', lambda model, size, fmt, path, *a: os.mkdir(path))
    monkeypatch.setattr(export, 'parity', lambda *a: {'measure': 'identical indices', 'n': 8,
                                                      'agreement': 0.98, 'ok': None})
    with pytest.raises(UserError, match='disagrees with the Keras model'):
        export.export_model(model, 112, 'saved_model', str(work / 'old'), images=images[:8])
    assert (work / 'old').is_dir() and not [n for n in os.listdir(work) if n.startswith('.old')]
    with pytest.raises(UserError, match='only tflite exports can be quantised'):
        export.check_options('onnx', 'dynamic')


def test_cli_prints_the_parity(tiny):
    work, cfg_path, _, _ = tiny
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='-1')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'export_model.py'), '--cfg_path',
                          cfg_path, '--format', 'tflite', '--quantize', 'dynamic', '--output',
                          'q.tflite'], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'tflite (dynamic-range quantised) IoM hashing model m=32 q=8' in out.stdout
    agreement = float(out.stdout.split('identical indices ')[1].split(',')[0])
    assert 0.3 < agreement <= 1.0 and 'required' not in out.stdout
    assert os.path.getsize(work / 'q.tflite') < 0.5 * os.path.getsize(work / 'iom.tflite')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'export_model.py'), '--cfg_path',
                          cfg_path, '--format', 'onnx', '--quantize', 'dynamic', '--output',
                          'x.onnx'], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and 'only tflite exports can be quantised' in out.stderr
    assert not (work / 'x.onnx').exists()
