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

from modules.utils import INSIGHT_UNITS, UserError, cli_guard, quiet_tensorflow  # noqa: E402

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
                                      'converted Keras model on the sample faces and fail if a '
                                      'cosine is below 0.9999')
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
    summary = convert_checkpoint(FLAGS.input, FLAGS.output, FLAGS.epoch, FLAGS.backbone, assume)
    print(format_summary(summary))
    tf_state = 'imported' if 'tensorflow' in sys.modules else 'not imported'
    print(f'start-up:    {startup:.2f} s (imports before the conversion; TensorFlow {tf_state} '
          'for the conversion)')
    if FLAGS.verify:  # only --verify needs TensorFlow (for the Keras model): a conversion does not
        quiet_tensorflow()
        from modules.weights.verify import verify_onnx
        start = time.perf_counter()
        try:
            cos = verify_onnx(FLAGS.input, FLAGS.output, summary['backbone'], summary['feed'])
        except UserError as err:
            os.remove(FLAGS.output)  # a conversion that failed its check leaves nothing behind
            raise UserError(f'{err} ({FLAGS.output} removed)') from None
        print(f'verify:      cosine to onnxruntime on {len(cos)} sample faces: min '
              f'{cos.min():.8f}, mean {cos.mean():.8f} ({time.perf_counter() - start:.2f} s '
              'with the TensorFlow import)')


if __name__ == '__main__':
    app.run(main)
