"""A tiny stage-2 model with saved checkpoints and synthetic face photos, for gallery/export tests.

The weights are random (seeded) but saved as stage-1 and stage-2 checkpoints, so the project's own
loaders (`load_iom_model`) find a fixed model, exactly as they find a trained one.
"""
import os

import numpy as np
import yaml

from tests.helpers.runs import load_generator

CFG = dict(batch_size=8, eval_batch_size=32, sub_name='tiny_s2', stage1_sub_name='tiny_s1',
           backbone_type='MobileNetV2', head_type='IoMHead', use_pretrain=False, embd_shape=64,
           train_dataset='unused', num_classes=10, num_samples=10, epochs=1, base_lr=0.1,
           test_dataset='unused', classes_per_batch=2, samples_per_class=4, m=32, q=8,
           loss_fun='batch_hard_arc_triplet_loss')


def make_tiny_model(workdir, seed=0, **overrides):
    """Write <workdir>/tiny.yaml and checkpoints/<sub_name>/ for a seeded random model; return path."""
    import tensorflow as tf

    from modules.config import STAGE2_REQUIRED, validate_config
    from modules.models import IoMFaceModel, arcface_from_config, stage1_checkpoint, stage2_checkpoint
    raw = dict(CFG, **overrides)
    cfg = validate_config(raw, 'tiny.yaml', STAGE2_REQUIRED)
    tf.keras.utils.set_random_seed(seed)
    arcface = arcface_from_config(cfg, use_pretrain=False)
    model = IoMFaceModel(cfg, arcface)
    stage1_checkpoint(arcface).save(os.path.join(workdir, 'checkpoints', cfg['stage1_sub_name'], 'ckpt'))
    stage2_checkpoint(model).save(os.path.join(workdir, 'checkpoints', cfg['sub_name'], 'ckpt'))
    path = os.path.join(workdir, 'tiny.yaml')
    with open(path, 'w') as fh:
        yaml.safe_dump(raw, fh)
    return path


def synthetic_faces(num_ids, per_id, seed=5):
    """RGB uint8 faces (num_ids * per_id, 112, 112, 3) and their identity labels."""
    gids = np.repeat(np.arange(num_ids), per_id)
    ks = np.tile(np.arange(per_id), num_ids)
    bgr, _ = load_generator().draw_images(seed, 'train', gids, ks)
    return np.ascontiguousarray(bgr[..., ::-1]), gids


def write_photos(folder, faces, names):
    """Save faces as JPEG files folder/<name>; return the paths."""
    import cv2
    os.makedirs(folder, exist_ok=True)
    paths = []
    for face, name in zip(faces, names):
        path = os.path.join(folder, name)
        cv2.imwrite(path, np.ascontiguousarray(face[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(path)
    return paths
