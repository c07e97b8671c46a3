"""Mirror an identity-folder tree of photographs into 112x112 ArcFace-aligned JPEGs (MTCNN + 5 points).

  .venv/bin/python data/align_faces.py --input_dir RAW --output_dir ALIGNED [--workers N] [--min_face 40]
      [--pad 0.25] [--cropped]

Photos at any depth under RAW are aligned (symbolic links followed); hidden files are skipped and
counted. Resumable (outputs that exist are skipped), every output written atomically; files with
no face, a face below --min_face pixels or unreadable bytes are counted in the summary and listed
with their reason in ALIGNED/align_report.csv. See docs/data.md, "Photographs: detection and
alignment".
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modules.utils import UserError, cli_guard, quiet_tensorflow  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Declare the CLI flags (only when run as a script, so importing this file has no effects)."""
    flags.DEFINE_string('input_dir', None, 'photos: <input_dir>/<identity>/<image>')
    flags.DEFINE_string('output_dir', None, 'aligned 112x112 JPEGs, same tree (.jpg names)')
    flags.DEFINE_integer('workers', os.cpu_count() or 1, 'processes aligning in parallel')
    flags.DEFINE_integer('min_face', 40, 'faces whose detection box is smaller (px) are rejected')
    flags.DEFINE_integer('jpeg_quality', 95, 'JPEG quality of the aligned crops')
    flags.DEFINE_float('pad', 0.0, 'when no face is found, search again inside a border of this '
                       'fraction of the longer side (edge pixels repeated): for faces that fill '
                       'the frame; 0 = no retry')
    flags.DEFINE_bool('cropped', False, 'the photos are already face crops: take each whole photo '
                      'as the face box (no detection, no rotation)')
    flags.mark_flags_as_required(['input_dir', 'output_dir'])


@cli_guard
def main(argv):
    """Align the tree, print one summary line and where the report is."""
    del argv
    if FLAGS.workers < 1:
        raise UserError(f'--workers must be at least 1, got {FLAGS.workers}')
    if not 1 <= FLAGS.jpeg_quality <= 100:
        raise UserError(f'--jpeg_quality must be in 1..100, got {FLAGS.jpeg_quality}')
    if not 0 <= FLAGS.pad <= 2:
        raise UserError(f'--pad must be in [0, 2] (a fraction of the longer side), got {FLAGS.pad}')
    if FLAGS.cropped and FLAGS.pad:
        raise UserError('--cropped takes each photo as the face box: there is no detection to '
                        'retry with --pad')
    quiet_tensorflow()
    from modules.align import REPORT_NAME, align_tree
    summary = align_tree(FLAGS.input_dir, FLAGS.output_dir, workers=FLAGS.workers,
                         min_face=FLAGS.min_face, jpeg_quality=FLAGS.jpeg_quality,
                         pad=FLAGS.pad, cropped=FLAGS.cropped)
    print(summary.listing)
    print(summary.line())
    print(f'report: {os.path.join(FLAGS.output_dir, REPORT_NAME)}')


if __name__ == '__main__':
    define_flags()
    app.run(main)
