"""Helpers for tests that run the training scripts: small identity trees, configs, runs."""
import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


NUM_IDS, PER_ID = 4, 6


def make_tree(root, num_ids=NUM_IDS, per_id=PER_ID, seed=0):
    """Identity folders of 112x112 JPEGs: each identity a colour and a stripe pattern, plus noise."""
    rng = np.random.default_rng(seed)
    for ident in range(num_ids):
        colour = rng.integers(40, 215, 3)
        period = 6 + 5 * ident
        for k in range(per_id):
            img = np.full((112, 112, 3), colour, np.float32)
            img[:, (np.arange(112) // period) % 2 == 0] *= 0.5
            img += rng.normal(0, 12, img.shape)
            path = os.path.join(root, f'id_{ident:02d}', f'{k}.jpg')
            os.makedirs(os.path.dirname(path), exist_ok=True)
            cv2.imwrite(path, np.clip(img, 0, 255).astype(np.uint8))


def write_cfg(tmp_path, tfrecord, **extra):
    cfg = dict(batch_size=8, sub_name='t', backbone_type='MobileNetV2', head_type='NormHead',
               use_pretrain=False, embd_shape=32, train_dataset=tfrecord, binary_img=True,
               num_classes=NUM_IDS, num_samples=NUM_IDS * PER_ID, epochs=100, base_lr=0.01,
               save_steps=2, max_steps=4, shuffle_buffer=64, test_dataset='unused')
    cfg.update(extra)
    path = tmp_path / 'cfg.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_script(args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'train.py')] + args, cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def last_json(stdout):
    return json.loads([line for line in stdout.splitlines() if line.startswith('{')][-1])


def load_generator():
    spec = importlib.util.spec_from_file_location(
        'make_synthetic_faces', os.path.join(ROOT, 'data', 'make_synthetic_faces.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
