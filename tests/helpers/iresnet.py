"""Random LResNet-IR (iresnet) networks for the weight-converter tests.

`source_params` draws the parameters every source format is written from, in MXNet's names and
layouts; `build` gives the Keras backbone they convert to; `convert_cli` runs the converter script
in a fresh process. Most networks take SMALL (33x33) inputs: with odd feature maps before every
stride-2 conv, TF's 'same' padding is the symmetric one-pixel padding of MXNet/PyTorch, so the
weight mapping is compared exactly against onnxruntime whatever the backbone's padding for 112x112
inputs.
"""
import os
import subprocess
import sys

import numpy as np

from modules import backbones
from modules.config import INSIGHT_UNITS
from modules.weights import load_npy_weights, write_weight_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, 'pre_models', 'convert_insightface.py')
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
SMALL = 33  # 33 -> 17 -> 9 -> 5 -> 3: odd before each stride-2 conv
TINY_UNITS = (1, 2, 1, 1)  # the reduced-depth network of the `tiny_iresnet` fixture (conftest.py)
FILTERS = (64, 128, 256, 512)
R18 = INSIGHT_UNITS['Insight_ResNet18']


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


def convert_cli(source, output, *extra):
    """Run the converter script in a fresh process."""
    return subprocess.run([sys.executable, SCRIPT, f'--input={source}', f'--output={output}',
                           *extra], capture_output=True, text=True, env=ENV, timeout=300)
