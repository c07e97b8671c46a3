"""Check a config's training data: decode a few batches (statistics, image grid), or --full: all of it."""
from absl import app, flags

from modules import script_flags
from modules.config import load_config
from modules.utils import cli_guard, quiet_tensorflow

script_flags.define(1, 'config file path (stage 1 or 2)')
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
flags.DEFINE_integer('num_batches', 2, 'number of batches to decode')
flags.DEFINE_string('output', 'logs/dataset_check.png', 'PNG grid of up to 32 images')
flags.DEFINE_boolean('augment', True, 'show the training augmentations (--noaugment: plain images)')
flags.DEFINE_boolean('full', False, 'decode every training image (TFRecord or identity folders) '
                     'and write a report of every bad record or file and why; exit status 1 when '
                     'there is any, 0 when all are good')
flags.DEFINE_string('report', 'logs/dataset_full_check.txt', '--full: report file')
FLAGS = flags.FLAGS


@cli_guard
def main(_):
    """Load the config and check its train_dataset; --full exits 1 when it found bad images."""
    cfg = load_config(FLAGS.cfg_path, required=('train_dataset', 'batch_size'))
    quiet_tensorflow()
    from modules.dataset_check import check_dataset, full_check
    if FLAGS.full:
        return 1 if full_check(cfg, FLAGS.report)[1] else 0
    check_dataset(cfg, FLAGS.num_batches, FLAGS.output, augment=FLAGS.augment)
    return 0


if __name__ == '__main__':
    app.run(main)
