"""Convert identity folders (<root>/<identity>/<image>.jpg) to a binary TFRecord.

Each record holds the label and the JPEG bytes: slow to convert, fast to read while training.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from modules.utils import cli_guard, quiet_tensorflow  # noqa: E402

flags.DEFINE_string('dataset_path', None, 'root of the identity folders, e.g. ms1m_align_112/imgs')
flags.DEFINE_string('output_path', './data/ms1m_bin.tfrecord', 'TFRecord file to write')
flags.DEFINE_integer('seed', 0, 'seed of the random record order')
flags.mark_flag_as_required('dataset_path')
FLAGS = flags.FLAGS


@cli_guard
def main(_):
    """Write the binary TFRecord and print the identity and image counts for the config."""
    quiet_tensorflow()
    from modules.tfrecords import write_tfrecord
    write_tfrecord(FLAGS.dataset_path, FLAGS.output_path, binary=True, seed=FLAGS.seed)


if __name__ == '__main__':
    app.run(main)
