"""Training throughput on this machine: stage-1 images/s per backbone and mode, stage-2 steps/s.

Stage 1 runs train.py's loop (MobileNetV2 and ResNet50 at 112x112, batch 64, eager_tf and fit)
on a small synthetic face set; stage 2 runs the IoM trainer with and without the embedding cache.
Every measurement is a fresh process, so graph tracing is paid once per run and left out of the
rate (the trainer starts its clock after the first step).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code, cwd):
    """Run Python `code` in a fresh interpreter in `cwd`; return the trainer's summary JSON."""
    proc = subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2'))
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith('{')][-1])


def main():
    """Build the data once, then time each configuration."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--steps', type=int, default=30, help='stage-1 steps per measurement')
    parser.add_argument('--stage2_steps', type=int, default=60)
    parser.add_argument('--backbones', default='MobileNetV2,ResNet50')
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='bench_training_')
    run(f"""
import importlib.util, os
path = os.path.join({ROOT!r}, 'data', 'make_synthetic_faces.py')
spec = importlib.util.spec_from_file_location('gen', path)
gen = importlib.util.module_from_spec(spec); spec.loader.exec_module(gen)
gen.generate('synthetic', num_train_ids=40, images_per_id=16, num_test_ids=16, num_pairs=60,
             num_retrieval_ids=4, retrieval_images_per_id=4, seed=1)
from modules.dataset import write_tfrecord
write_tfrecord('synthetic/train', 'synthetic/train.tfrecord', binary=True)
print('{{}}')
""", work)
    base = dict(batch_size=64, eval_batch_size=128, backbone_type='MobileNetV2', head_type='ArcHead',
                use_pretrain=False, train_dataset='synthetic/train.tfrecord', binary_img=True,
                num_classes=40, num_samples=640, epochs=1000, base_lr=0.01, save_steps=10_000,
                max_steps=args.steps, test_dataset='synthetic/test_dataset')
    print(f'stage 1: 112x112, batch 64, {args.steps} steps, {os.cpu_count()} CPU cores')
    for backbone in args.backbones.split(','):
        for mode in ('eager_tf', 'fit'):
            name = f'{backbone}_{mode}'
            with open(os.path.join(work, name + '.yaml'), 'w') as fh:
                yaml.safe_dump(dict(base, backbone_type=backbone, sub_name=name), fh)
            out = run(f"""
from modules.training import train_stage1
from modules.utils import load_config
train_stage1(load_config('{name}.yaml'), '{mode}')
""", work)
            print(f'  {backbone:12s} {mode:8s} {out["images_per_second"]:8.1f} images/s')

    stage2 = dict(base, sub_name='iom', stage1_sub_name='MobileNetV2_eager_tf', head_type='IoMHead',
                  train_dataset='synthetic/train', binary_img=False, classes_per_batch=16,
                  samples_per_class=4, batch_size=64, m=512, q=8, max_steps=args.stage2_steps,
                  loss_fun='batch_hard_arc_triplet_loss')
    print(f'stage 2: MobileNetV2 backbone, m=512 q=8, batch 16x4, {args.stage2_steps} steps')
    for cached in (False, True):
        name = f'iom_cache_{cached}'
        with open(os.path.join(work, name + '.yaml'), 'w') as fh:
            yaml.safe_dump(dict(stage2, sub_name=name, cache_embeddings=cached), fh)
        out = run(f"""
from modules.training import train_stage2
from modules.utils import STAGE2_REQUIRED, load_config
train_stage2(load_config('{name}.yaml', STAGE2_REQUIRED))
""", work)
        label = 'cached embeddings' if cached else 'images through the frozen backbone'
        print(f'  {label:36s} {out["steps_per_second"]:8.2f} steps/s')
    print(f'(work folder {work})')


if __name__ == '__main__':
    main()
