"""Pack a verification set from the dataset's originals into InsightFace's .bin (what test.py reads).

  python data/make_verification_bin.py --protocol lfw --images lfw --pairs pairs.txt --output_dir TEST
  python data/make_verification_bin.py --protocol cfp_fp --root cfp-dataset --output_dir TEST

Every photo of the protocol is aligned once to the 112x112 ArcFace crop (MTCNN, or --landmarks),
the pairs keep the protocol's order (fold after fold) and TEST/<protocol>.bin is written
atomically, with TEST/<protocol>_report.csv naming every photo found only inside the --pad border
or given the fallback crop. A missing photo stops the run before anything is aligned. See
docs/data.md, "Test sets from the datasets' originals".
"""
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modules.utils import UserError, cli_guard  # noqa: E402
from modules.verification_bin import PROTOCOLS  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Declare the CLI flags (only when run as a script, so importing this file has no effects)."""
    flags.DEFINE_enum('protocol', None, PROTOCOLS, 'lfw: LFW View 2 pairs.txt; cfp_fp / cfp_ff: '
                      "CFP's frontal-profile / frontal-frontal 10-fold protocol")
    flags.DEFINE_string('images', None, 'lfw: folder of <name>/<name>_NNNN.jpg (lfw/ as '
                        'distributed, or lfw-deepfunneled/)')
    flags.DEFINE_string('pairs', None, "lfw: the pairs file (View 2's pairs.txt)")
    flags.DEFINE_string('root', None, 'cfp_fp / cfp_ff: the CFP folder holding Protocol/ and Data/')
    flags.DEFINE_string('output_dir', None, 'where <protocol>.bin goes: the test_dataset folder '
                        'of your config')
    flags.DEFINE_string('landmarks', None, 'align by these five points instead of detecting: '
                        'lines "<photo> x1 y1 ... x5 y5" (photo relative to --images / --root; '
                        'left eye, right eye, nose, left and right mouth corner)')
    flags.DEFINE_float('pad', 0.25, 'when no face is found, search again inside a border of this '
                       'fraction of the longer side (0: no retry)')
    flags.DEFINE_bool('fail', False, 'stop at the first photo without a face instead of giving it '
                      'the fallback crop (the central expected face box)')
    flags.DEFINE_integer('workers', os.cpu_count() or 1, 'processes aligning in parallel')
    flags.DEFINE_integer('jpeg_quality', 95, 'JPEG quality of the packed crops')
    flags.DEFINE_list('folds', None, 'only these protocol folds, e.g. 10 (1-based, file order '
                      'kept): a held-out fold for a model trained on the others')
    flags.DEFINE_bool('cropped', False, 'the photos are already face crops: take each whole photo '
                      'as the face box (as align_faces.py --cropped does) instead of detecting')
    flags.mark_flags_as_required(['protocol', 'output_dir'])


@cli_guard
def main(argv):
    """Read the protocol, align its photos, write the .bin and print one summary line."""
    del argv
    if FLAGS.workers < 1:
        raise UserError(f'--workers must be at least 1, got {FLAGS.workers}')
    if not 1 <= FLAGS.jpeg_quality <= 100:
        raise UserError(f'--jpeg_quality must be in 1..100, got {FLAGS.jpeg_quality}')
    if not 0 <= FLAGS.pad <= 2:
        raise UserError(f'--pad must be in [0, 2] (a fraction of the longer side), got {FLAGS.pad}')
    if FLAGS.cropped and FLAGS.landmarks:
        raise UserError('--cropped takes each photo as the face box: drop --landmarks')
    try:
        folds = [int(k) for k in FLAGS.folds] if FLAGS.folds else None
    except ValueError:
        raise UserError(f'--folds takes fold numbers such as 10 or 1,2, got {FLAGS.folds}') from None
    from modules.verification_bin import make_verification_bin
    report = make_verification_bin(FLAGS.protocol, FLAGS.output_dir, images=FLAGS.images,
                                   pairs_path=FLAGS.pairs, root=FLAGS.root,
                                   landmarks_path=FLAGS.landmarks, pad=FLAGS.pad, fail=FLAGS.fail,
                                   workers=FLAGS.workers, jpeg_quality=FLAGS.jpeg_quality,
                                   folds=folds, cropped=FLAGS.cropped)
    print(report.line())
    print(f'report: {report.report} ({len(report.rows)} photos not found by plain detection)')


if __name__ == '__main__':
    define_flags()
    app.run(main)
