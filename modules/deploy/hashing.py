"""Hashing photos for a gallery: the IoM model under a key (TensorFlow), and opening a gallery with it.

`modules.deploy.gallery` holds the database side (keys, storage, decisions, tokens); this module
loads the model, checks that it can work under a gallery key, checks it against the gallery and
turns photos into codes, for gallery.py, serve.py and the benchmarks. TensorFlow is imported
inside the functions that run the model, never at import time.
"""
import glob
import hashlib
import json
import os
import sys

import numpy as np

from modules.config import STAGE2_REQUIRED, checkpoint_dir, load_config, log_dir
from modules.deploy.gallery import Gallery
from modules.deploy.search import pack_codes
from modules.utils import UserError, quiet_tensorflow


def model_fingerprint(model, m, q):
    """SHA-256 over every weight of the hashing model (in model order) and m, q."""
    digest = hashlib.sha256(f'iomface m={int(m)} q={int(q)}'.encode())
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(f'{value.dtype.str}{value.shape}'.encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def check_key_change(cfg):
    """UserError when the model of `cfg` cannot be used under a key other than its training one.

    Refused: a model whose hidden layers follow the permutation (`perm_position: input`), and a
    model whose latest eval_protection.py report, for the checkpoint in use now, found its codes
    unfit for a new key (EER worse under new keys, or revoked codes still accepted).
    """
    from modules.models import check_rekeyable, latest_checkpoint
    check_rekeyable(cfg)
    ckpt = latest_checkpoint(checkpoint_dir(cfg))
    for path in sorted(glob.glob(os.path.join(log_dir(cfg), 'protection_*.json'))):
        try:
            with open(path, encoding='utf-8') as fh:
                report = json.load(fh)
        except (OSError, ValueError):
            continue  # not a protection report of ours: nothing measured to go by
        if (isinstance(report, dict) and report.get('key_change_ok') is False
                and (report.get('loaded_from') or {}).get('iom') == ckpt):
            problem = (report.get('key_change_problems') or ['codes unfit for a new key'])[0]
            raise UserError(f"{path}: eval_protection.py found that {cfg['sub_name']}'s codes do "
                            f'not work under a new key ({problem}); train stage 2 again (another '
                            'hidden_layer_remark or temperature) or keep one fixed key')


class Hasher:
    """The IoM model of a config under an application key: photos -> uint8 codes."""

    def __init__(self, cfg, key):
        from modules.models import load_iom_model
        if key is not None:
            check_key_change(cfg)
        self.cfg = cfg
        self.model = load_iom_model(cfg, perm_key=key, verbose=False)
        if not self.model.loaded_from['iom']:
            raise UserError(f"no stage-2 checkpoint in checkpoints/{cfg['sub_name']}/: train the "
                            'model first (a gallery of a random projection is useless)')
        self.fingerprint = model_fingerprint(self.model, cfg['m'], cfg['q'])
        self._forward = lambda x: self.model(x, training=False)
        embed = self.model.get_layer('arcface_model')
        self._embed = lambda x: embed(x, training=False)  # for subject keys: hashed afterwards

    def trace(self):
        """Run the model as one traced graph for every batch size from now on: tracing costs
        ~1 s once, an eager call ~0.1 s of Python per batch (a long-running server's choice; a
        one-photo CLI command is faster eager)."""
        import tensorflow as tf
        size = self.cfg['input_size']
        spec = [tf.TensorSpec([None, size, size, 3], tf.float32)]
        self._forward = tf.function(self._forward, input_signature=spec)
        self._embed = tf.function(self._embed, input_signature=spec)
        self._forward(tf.zeros([1, size, size, 3]))
        return self

    def _run(self, forward, faces):
        faces = np.asarray(faces)
        batch = self.cfg['eval_batch_size']
        return np.concatenate([forward(faces[i:i + batch].astype(np.float32) / 255.0).numpy()
                               for i in range(0, len(faces), batch)])

    def codes(self, faces, subject_key=None):
        """uint8 codes (N, m) of aligned uint8 faces (N, size, size, 3), under the application
        key or, when given, a subject's key (the embedding model runs once either way)."""
        if subject_key is None:
            return pack_codes(self._run(self._forward, faces), self.cfg['q'], 'model output')
        return self.subject_codes(self._run(self._embed, faces), [subject_key] * len(faces))

    def embeddings(self, faces):
        """Float embeddings (N, d) of aligned uint8 faces: what subject keys are applied to."""
        return self._run(self._embed, faces)

    def subject_codes(self, embeddings, keys):
        """uint8 codes of embeddings, row i hashed under keys[i] (rows sharing a key together)."""
        from modules.models import iom_codes
        out = np.zeros((len(keys), self.cfg['m']), np.int32)
        for key in set(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            out[rows] = iom_codes(self.model, embeddings[rows], perm_key=key)
        return pack_codes(out, self.cfg['q'], 'model output')

    def photo_codes(self, paths, align='auto', subject_key=None):
        """uint8 codes of photo files (aligned with modules.align when not already crops)."""
        from modules.align import load_face
        size = self.cfg['input_size']
        return self.codes(np.stack([load_face(p, size, align) for p in paths]), subject_key)


def init_with_model(db_path, cfg_path, key_mode='application', key_file=None):
    """Create a gallery for the stage-2 model of `cfg_path` (refused before loading the model when
    the database or its key file exists, or the model cannot change keys); returns (gallery, cfg)."""
    Gallery.check_new(db_path, key_file, cfg_path)
    cfg = load_config(cfg_path, STAGE2_REQUIRED)
    check_key_change(cfg)
    quiet_tensorflow()
    # The fingerprint does not depend on the key (PermLayer has no weights).
    hasher = Hasher(cfg, key=None)
    return Gallery.create(db_path, cfg_path, cfg['m'], cfg['q'], hasher.fingerprint,
                          key_mode, key_file), cfg


def open_with_model(db_path, cfg_path=None, name=None, key_file=None):
    """(gallery, hasher, cfg): the gallery and its hashing model under its key. A model other than
    the gallery's is refused, and an unknown `name` before the model is loaded."""
    gallery = Gallery.open(db_path, key_file)
    if name is not None:
        gallery.templates_of(name)
    cfg = load_config(cfg_path or gallery.meta['cfg_path'], STAGE2_REQUIRED)
    if gallery.subject_keys:
        check_key_change(cfg)  # (the Hasher checks it for an application key)
    quiet_tensorflow()
    hasher = Hasher(cfg, gallery.key)
    gallery.check_model(hasher.fingerprint, cfg['m'], cfg['q'])
    return gallery, hasher, cfg


def identity_folders(input_dir):
    """[(name, [image paths])] of the sub-folders of `input_dir` (one subject each, photos at any
    depth, links followed: `modules.folders`), sorted; prints what it skipped and why."""
    from modules.align import IMAGE_EXTENSIONS
    from modules.folders import scan_identity_folders
    if not os.path.isdir(input_dir):
        raise UserError(f'{input_dir}: not a directory')
    scan = scan_identity_folders(input_dir, IMAGE_EXTENSIONS)
    folders = sorted([(name, [os.path.join(input_dir, rel) for rel in rels])
                      for name, rels in scan.identities] + [(name, []) for name in scan.empty])
    if not folders:
        raise UserError(f'{input_dir}: no identity folders (expected <input_dir>/<name>/<photo>)')
    print(scan.skip_line(), file=sys.stderr)
    return folders


def enroll_folders(gallery, folders, faces_to_codes, load, progress=True):
    """Enrol each (name, paths) not yet in the gallery; a subject is one transaction, so a killed
    run resumes where it stopped. `load(path)` gives an aligned face, `faces_to_codes` their codes.
    Returns a summary dict: enrolled, templates, skipped, failed [(path, reason)], empty [names]."""
    from tqdm import tqdm

    from modules.align import FaceError
    summary = {'enrolled': 0, 'templates': 0, 'skipped': 0, 'failed': [], 'empty': []}
    done = gallery.enrolled_names()
    for name, paths in tqdm(folders, desc='enrol', unit='subject', disable=not progress):
        if name in done:
            summary['skipped'] += 1
            continue
        faces, used = [], []
        for path in paths:
            try:
                faces.append(load(path))
                used.append(path)
            except FaceError as err:
                summary['failed'].append((path, err.reason))
            except UserError as err:
                summary['failed'].append((path, str(err)))
        if not faces:
            summary['empty'].append(name)
            continue
        added = gallery.enroll(name, faces_to_codes(np.stack(faces)), used, only_new=True)
        summary['enrolled'] += bool(added)
        summary['skipped'] += not added
        summary['templates'] += added
    return summary
