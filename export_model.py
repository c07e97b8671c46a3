"""Export the stage-2 hashing model (or its float embedding model) and check it against Keras.

    export_model.py --cfg_path CFG --format saved_model|tflite|onnx --output PATH
                    [--embedding] [--quantize dynamic]
"""
import os

from absl import app, flags

from modules import script_flags
from modules.config import STAGE2_REQUIRED, load_config
from modules.utils import UserError, cli_guard, quiet_tensorflow

script_flags.define(2, 'stage-2 config file path')
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
flags.DEFINE_enum('format', 'saved_model', ['saved_model', 'tflite', 'onnx'], 'export format')
flags.DEFINE_string('output', None, 'output file (tflite, onnx) or folder (saved_model)')
flags.DEFINE_bool('embedding', False, 'export the float embedding model (N, embd_shape) instead '
                  'of the IoM hashing model (N, m) int32')
flags.DEFINE_enum('quantize', 'none', ['none', 'dynamic'], 'tflite: dynamic-range quantisation')
FLAGS = flags.FLAGS


@cli_guard
def main(_):
    """Load the model, export it and print the parity with the Keras model."""
    if not FLAGS.output:
        raise UserError('--output is required')
    from modules.deploy.export import check_options
    check_options(FLAGS.format, FLAGS.quantize)
    cfg = load_config(FLAGS.cfg_path, STAGE2_REQUIRED)
    quiet_tensorflow()
    from modules.deploy.export import export_model, parity_images
    from modules.models import load_iom_model
    size = cfg['input_size']
    images = parity_images(size)  # bad sample photos fail before the model is built
    model = load_iom_model(cfg)
    what = 'embedding model' if FLAGS.embedding else f"IoM hashing model m={cfg['m']} q={cfg['q']}"
    result = export_model(model, size, FLAGS.format, FLAGS.output, FLAGS.embedding,
                          FLAGS.quantize, images)
    size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(FLAGS.output)
                  for f in files) if os.path.isdir(FLAGS.output) else os.path.getsize(FLAGS.output)
    quant = ' (dynamic-range quantised)' if FLAGS.quantize != 'none' else ''
    print(f'[*] wrote {FLAGS.output}: {FLAGS.format}{quant} {what}, {size_mb / 1e6:.1f} MB')
    extra = f", worst image {result['worst']:.4f}" if 'worst' in result else ''
    required = result.get('required')
    need = f' (required >= {required})' if required is not None else ''
    if FLAGS.embedding:
        extra = f" (1 - cosine = {1 - result['agreement']:.1e}, required <= 1e-4)"
    print(f"parity with Keras on {result['n']} faces (sample photos + synthetic): "
          f"{result['measure']} {result['agreement']:.6f}{extra}{need}")


if __name__ == '__main__':
    app.run(main)
