"""Convert an InsightFace recognition model (ONNX or MXNet checkpoint) to our weight-dict .npy.

    python pre_models/convert_insightface.py --input model.onnx --output pre_models/resnet100/resnet100.npy
    python pre_models/convert_insightface.py --input /path/model --epoch 0 --output ...
      (an MXNet checkpoint: /path/model-symbol.json + /path/model-0000.params)

Nothing is downloaded and MXNet is not needed. See pre_models/README.md for formats and mapping.
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.utils import INSIGHT_UNITS, UserError, cli_guard, quiet_tensorflow  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('input', None, 'model.onnx, or an MXNet checkpoint prefix (prefix-symbol.json '
                                   '+ prefix-EPOCH.params)')
flags.DEFINE_integer('epoch', 0, 'MXNet checkpoint epoch (the 4-digit number in the .params name)')
flags.DEFINE_string('output', None, 'weight-dict .npy to write, e.g. '
                                    'pre_models/resnet100/resnet100.npy')
flags.DEFINE_enum('backbone', None, list(INSIGHT_UNITS),
                  'expected backbone (default: inferred from the unit counts)')
flags.DEFINE_float('input_mean', None, 'only for graphs that do not normalise their input: the '
                                       'mean they expect (default 127.5)')
flags.DEFINE_float('input_std', None, 'only for graphs that do not normalise their input: the std '
                                      'they expect (default 127.5 for ONNX, 128 for MXNet)')
flags.mark_flags_as_required(['input', 'output'])


@cli_guard
def main(_):
    """Convert --input to --output and print a summary."""
    quiet_tensorflow()
    from modules.weights import convert_checkpoint, format_summary
    if not FLAGS.output.endswith('.npy'):
        raise UserError(f'--output must be a .npy file, got {FLAGS.output}')
    if FLAGS.epoch < 0:
        raise UserError(f'--epoch must not be negative, got {FLAGS.epoch}')
    assume = None
    if FLAGS.input_mean is not None or FLAGS.input_std is not None:
        default_std = 127.5 if FLAGS.input.lower().endswith('.onnx') else 128.0
        assume = (127.5 if FLAGS.input_mean is None else FLAGS.input_mean,
                  default_std if FLAGS.input_std is None else FLAGS.input_std)
        if assume[1] == 0:
            raise UserError('--input_std must not be 0')
    summary = convert_checkpoint(FLAGS.input, FLAGS.output, FLAGS.epoch, FLAGS.backbone, assume)
    print(format_summary(summary))


if __name__ == '__main__':
    app.run(main)
