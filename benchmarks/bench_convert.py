"""Benchmark pre_models/convert_insightface.py on every source format: time and agreement.

Run: .venv/bin/python benchmarks/bench_convert.py [--backbone Insight_ResNet100]

One random-weight network of the chosen depth (randomised BatchNorm statistics and PReLU slopes,
112x112 input) is written in every format the converter reads, with the writers the tests use:
an arcface_torch `backbone.pth` (conv and fc weights float16, as fp16-trained files), a legacy
PyTorch ONNX export, a dynamo export (opset 18, external data, Reshape, BN folded into Gemm), an
MXNet-style ONNX (normalisation nodes, BN kept) and an MXNet checkpoint. Each is converted by the
command-line script in a fresh process (the wall time includes Python start-up; the CPU time of
the conversion is the figure to trust on a busy machine), and the converted Keras backbone is
compared with onnxruntime running an ONNX graph of the same parameters on the project's sample
face photos (data/samples and their mirror images): the minimum cosine is reported.
"""
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modules.config import INSIGHT_UNITS  # noqa: E402
from modules.utils import cli_guard, quiet_tensorflow  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum('backbone', 'Insight_ResNet100', list(INSIGHT_UNITS), 'network depth')
flags.DEFINE_integer('seed', 0, 'random seed of the weights')

TORCH_FEED = (1 / 127.5, -1.0)


def convert(source, output, extra=()):
    """Run the converter script; (wall s, conversion s, conversion CPU s, start-up s, stdout)."""
    script = os.path.join(ROOT, 'pre_models', 'convert_insightface.py')
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    start = time.perf_counter()
    done = subprocess.run([sys.executable, script, f'--input={source}', f'--output={output}',
                           *extra], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f'conversion of {source} failed:\n{done.stderr}')
    total = float(re.search(r'time: +([0-9.]+) s', done.stdout).group(1))
    cpu = float(re.search(r'CPU ([0-9.]+) s', done.stdout).group(1))
    startup = float(re.search(r'start-up: +([0-9.]+) s', done.stdout).group(1))
    return wall, total, cpu, startup, done.stdout


@cli_guard
def main(_):
    """Write, convert and compare every format; print one table."""
    quiet_tensorflow()
    from modules.backbones import insight_resnet
    from modules.weights import load_npy_weights
    from modules.weights.verify import onnx_embeddings, sample_faces
    from tests.helpers.iresnet import source_params  # the format writers of the weight tests
    from tests.helpers.mxnet_files import write_mx_params, write_mx_symbol
    from tests.helpers.onnx_graphs import make_onnx
    from tests.helpers.pth_files import params_of_state, torch_state, write_pth

    units = INSIGHT_UNITS[FLAGS.backbone]
    faces = sample_faces(112)
    model = insight_resnet(FLAGS.backbone, (112, 112, 3))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        params = source_params(units, 7, seed=FLAGS.seed, fc1_gamma_random=False)
        state = torch_state(params, units, half=('conv', 'downsample.0', 'fc'))
        pth = write_pth(os.path.join(tmp, 'backbone.pth'), state)
        pth_params = params_of_state(params, state, units)
        pth_ref = make_onnx(pth_params, units, 7, 'pytorch', os.path.join(tmp, 'pth_ref.onnx'))
        legacy = make_onnx(params, units, 7, 'pytorch', os.path.join(tmp, 'legacy.onnx'))
        dynamo = make_onnx(params, units, 7, 'dynamo', os.path.join(tmp, 'dynamo.onnx'),
                           opset=18)
        prefix = os.path.join(tmp, 'model')
        write_mx_symbol(prefix + '-symbol.json', units)
        write_mx_params(prefix + '-0000.params', {
            ('aux:' if k.endswith(('_moving_mean', '_moving_var')) else 'arg:') + k: v
            for k, v in params.items()})
        mx_ref = make_onnx(params, units, 7, 'mxnet', os.path.join(tmp, 'mx_ref.onnx'))
        cases = [('arcface_torch .pth (fp16 convs)', pth, [pth], pth_ref, TORCH_FEED),
                 ('ONNX, legacy PyTorch export', legacy, [legacy], legacy, TORCH_FEED),
                 ('ONNX, dynamo export (opset 18)', dynamo, [dynamo, dynamo + '.data'], dynamo,
                  TORCH_FEED),
                 ('ONNX converted from MXNet', mx_ref, [mx_ref], mx_ref, None),
                 ('MXNet checkpoint', prefix, [prefix + '-symbol.json', prefix + '-0000.params'],
                  mx_ref, None)]
        for label, source, files, reference, feed in cases:
            out = os.path.join(tmp, 'out.npy')
            wall, total, cpu, startup, _ = convert(source, out)
            load_npy_weights(model, out)
            ours = model(faces.astype(np.float32) / 255.0, training=False).numpy()
            ref, _ = onnx_embeddings(reference, faces, feed)  # None: the graph normalises itself
            ours, ref = ours.astype(np.float64), ref.astype(np.float64)
            cos = np.sum(ours * ref, 1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
            size = sum(os.path.getsize(f) for f in files) / 2**20
            rows.append((label, size, wall, total, cpu, startup, cos.min()))
        verify_wall, _, _, _, stdout = convert(dynamo, os.path.join(tmp, 'v.npy'), ['--verify'])
        verify_line = [line for line in stdout.splitlines() if line.startswith('verify:')][0]
    print(f'{FLAGS.backbone} {list(units)}, 112x112, {len(faces)} sample faces; '
          f'{model.count_params():,} Keras parameters')
    print(f'{"source":32s} {"MiB":>6s} {"process s":>9s} {"conversion s":>12s} {"CPU s":>6s} '
          f'{"start-up s":>10s} {"min cosine":>11s} {"1 - min cos":>11s}')
    for label, size, wall, total, cpu, startup, cos in rows:
        print(f'{label:32s} {size:6.1f} {wall:9.2f} {total:12.2f} {cpu:6.2f} {startup:10.2f} '
              f'{cos:11.8f} {1 - cos:11.1e}')
    print(f'dynamo ONNX with --verify: process {verify_wall:.2f} s; {verify_line}')


if __name__ == '__main__':
    app.run(main)
