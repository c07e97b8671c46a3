"""Convert an InsightFace recognition model (ONNX, PyTorch .pth or MXNet) to our weight-dict .npy.

    python pre_models/convert_insightface.py --input model.onnx --output pre_models/resnet100/resnet100.npy
    python pre_models/convert_insightface.py --input backbone.pth --output ...
      (an arcface_torch iresnet state dict; PyTorch is not needed)
    python pre_models/convert_insightface.py --input /path/model --epoch 0 --output ...
      (an MXNet checkpoint: /path/model-symbol.json + /path/model-0000.params)

Nothing is downloaded, and neither MXNet, PyTorch nor TensorFlow is imported unless --verify asks
for the Keras model. See pre_models/README.md for formats and mapping.
"""
import time

START = time.perf_counter()

import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.config import INSIGHT_UNITS  # noqa: E402
from modules.utils import UserError, atomic_path, cli_guard  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('input', None, 'model.onnx, backbone.pth, or an MXNet checkpoint prefix '
                                   '(prefix-symbol.json + prefix-EPOCH.params)')
flags.DEFINE_integer('epoch', 0, 'MXNet checkpoint epoch (the 4-digit number in the .params name)')
flags.DEFINE_string('output', None, 'weight-dict .npy to write, e.g. '
                                    'pre_models/resnet100/resnet100.npy')
flags.DEFINE_enum('backbone', None, list(INSIGHT_UNITS),
                  'expected backbone (default: inferred from the unit counts)')
flags.DEFINE_float('input_mean', None, 'only for sources that do not normalise their input: the '
                                       'mean they expect (default 127.5)')
flags.DEFINE_float('input_std', None, 'only for sources that do not normalise their input: the '
                                      'std they expect (default 127.5 for ONNX and .pth, 128 for '
                                      'MXNet)')
flags.DEFINE_boolean('verify', False, 'ONNX sources: run the source (onnxruntime) and the '
                                      'converted Keras model on the sample faces; the .npy is '
                                      'written only if 1 - cos <= 1e-6 on every face')
flags.mark_flags_as_required(['input', 'output'])


@cli_guard
def main(_):
    """Convert --input to --output and print a summary."""
    startup = time.perf_counter() - START
    from modules.weights.convert import (
        DEFAULT_NORM,
        convert_checkpoint,
        format_summary,
        source_format,
    )
    if not FLAGS.output.endswith('.npy'):
        raise UserError(f'--output must be a .npy file, got {FLAGS.output}')
    if FLAGS.epoch < 0:
        raise UserError(f'--epoch must not be negative, got {FLAGS.epoch}')
    kind = source_format(FLAGS.input)
    if FLAGS.verify and kind != 'onnx':
        raise UserError('--verify runs the source with onnxruntime, so it needs an ONNX --input '
                        f'(got a {kind} source)')
    assume = None
    if FLAGS.input_mean is not None or FLAGS.input_std is not None:
        mean, std = DEFAULT_NORM[kind]
        assume = (mean if FLAGS.input_mean is None else FLAGS.input_mean,
                  std if FLAGS.input_std is None else FLAGS.input_std)
        if assume[1] == 0:
            raise UserError('--input_std must not be 0')
    # The .npy is written beside --output and renamed into place only once everything, --verify
    # included, succeeded: a failure leaves no new file (and an older one untouched).
    with atomic_path(FLAGS.output) as staged:
        summary = convert_checkpoint(FLAGS.input, staged, FLAGS.epoch, FLAGS.backbone, assume)
        summary['output'] = FLAGS.output
        print(format_summary(summary))
        tf_state = 'imported' if 'tensorflow' in sys.modules else 'not imported'
        print(f'start-up:    {startup:.2f} s (imports before the conversion; TensorFlow '
              f'{tf_state} for the conversion)')
        if FLAGS.verify:
            _verify(summary, staged)


def _verify(summary, staged):
    """Compare the staged .npy with its ONNX source; any failure is one UserError line."""
    import numpy as np

    # verify_onnx imports TensorFlow (for the Keras model) once onnxruntime has run the source.
    from modules.weights.verify import MAX_ONE_MINUS_COS, verify_onnx
    start = time.perf_counter()
    try:
        gap, batch = verify_onnx(FLAGS.input, staged, summary['backbone'], summary['feed'],
                                 summary['fixed_batch'])
    except UserError as err:
        raise UserError(f'{err} ({FLAGS.output} not written)') from None
    except Exception as err:  # noqa: BLE001 - a crash in onnxruntime or TensorFlow is a failed check
        first = (str(err).strip().splitlines() or [''])[0]
        raise UserError(f'--verify failed: {type(err).__name__}: {first} ({FLAGS.output} not '
                        'written)') from None
    runs = 'one image at a time' if batch == 1 else f'{batch} images per run'
    print(f'verify:      1 - cos to onnxruntime on {len(gap)} sample faces: worst {gap.max():.1e} '
          f'(limit {MAX_ONE_MINUS_COS:g}), median {np.median(gap):.1e}; onnxruntime ran {runs} '
          f'({time.perf_counter() - start:.2f} s with the TensorFlow import)')


if __name__ == '__main__':
    app.run(main)
