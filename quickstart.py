"""The whole pipeline on the embedded synthetic face set, as `make quickstart` runs it.

Each step is one of the project's own commands, printed before it runs, so a reader can repeat
any of them by hand. At the end one table shows, per test set, the float ArcFace embedding, the
learned IoM codes and a seeded random IoM of the same m, q and key (Jin et al.'s Gaussian random
projections) side by side.
"""
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from modules.config import STAGE2_REQUIRED, load_config, log_dir
from modules.utils import UserError, cli_guard

flags.DEFINE_string('stage1_cfg', 'configs/quickstart_stage1.yaml', 'stage-1 config')
flags.DEFINE_string('stage2_cfg', 'configs/quickstart_stage2.yaml', 'stage-2 config')
flags.DEFINE_string('data_dir', 'data/synthetic', 'where the synthetic face set goes')
FLAGS = flags.FLAGS


def run(args):
    """Run one project command with this interpreter; stop the quickstart if it fails."""
    print(f"\n$ python {' '.join(args)}", flush=True)
    started = time.perf_counter()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    if subprocess.run([sys.executable] + args, env=env).returncode:  # noqa: S603 - fixed argv
        raise UserError(f"quickstart step failed: python {' '.join(args)}")
    print(f'[{time.perf_counter() - started:.0f} s]', flush=True)


@cli_guard
def main(_):
    """Generate data, train and evaluate both stages, run run_me.py, print the three-row table."""
    started = time.perf_counter()
    stage1 = load_config(FLAGS.stage1_cfg)
    stage2 = load_config(FLAGS.stage2_cfg, STAGE2_REQUIRED)
    manifest = os.path.join(FLAGS.data_dir, 'manifest.json')
    if not os.path.isfile(manifest):
        run(['data/make_synthetic_faces.py', '--output_dir', FLAGS.data_dir])
    if not os.path.isfile(stage1['train_dataset']):
        run(['data/convert_train_binary_tfrecord.py', '--dataset_path',
             os.path.join(FLAGS.data_dir, 'train'), '--output_path', stage1['train_dataset']])
    run(['train.py', '--mode', 'eager_tf', '--cfg_path', FLAGS.stage1_cfg])
    run(['test.py', '--cfg_path', FLAGS.stage1_cfg])
    run(['train_twostage_tripletloss_online.py', '--cfg_path', FLAGS.stage2_cfg])
    run(['test_twostage_iom.py', '--cfg_path', FLAGS.stage2_cfg, '--measure', 'Hamming',
         '--baseline', 'random'])
    run(['run_me.py', '--cfg_path', FLAGS.stage2_cfg])
    with open(os.path.join(log_dir(stage2), 'iom_Hamming_comparison.json')) as fh:
        comparison = json.load(fh)
    from modules.evaluations import format_comparison
    print(f'\nQuickstart results on the synthetic verification sets '
          f'({time.perf_counter() - started:.0f} s in all):')
    print(format_comparison(comparison))


if __name__ == '__main__':
    app.run(main)
