"""Stage 1: train the ArcFace backbone described by a YAML config."""
from absl import app, flags

from modules import script_flags
from modules.config import load_config
from modules.utils import cli_guard, float16_without_onednn, quiet_tensorflow

script_flags.define(1, 'config file path', gpu=True)
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
flags.DEFINE_enum('mode', 'eager_tf', ['fit', 'eager_tf'],
                  'fit: Keras model.fit; eager_tf: custom loop with tf.GradientTape in tf.function')
flags.DEFINE_integer('cpu_devices', None, 'split the CPU into N logical devices (replicas), e.g. '
                     'to try Partial FC on a machine without GPUs')
FLAGS = flags.FLAGS


@cli_guard
def main(_):
    """Load the config and run the stage-1 training loop."""
    cfg = load_config(FLAGS.cfg_path)
    float16_without_onednn(cfg)
    quiet_tensorflow()
    from modules.training import configure_devices, train_stage1
    configure_devices(FLAGS.gpu, FLAGS.cpu_devices)
    train_stage1(cfg, FLAGS.mode)


if __name__ == '__main__':
    app.run(main)
