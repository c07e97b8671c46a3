"""IJB-B / IJB-C verification: pooling against InsightFace's loop, TAR@FAR against a direct count,
pair scores, readers' errors, the resumable feature cache, and test_ijb.py end to end on a tiny
IJB-format set made here from synthetic faces placed in larger photos at known landmarks."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

from modules import ijb
from modules.align import ARCFACE_TEMPLATE
from modules.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IDS, SEED = 6, 5
STAGE1 = dict(batch_size=8, eval_batch_size=16, sub_name='ijb_s1', backbone_type='MobileNetV2',
              use_pretrain=False, embd_shape=32, train_dataset='unused', num_classes=2,
              num_samples=8, epochs=1, base_lr=0.1, test_dataset='unused')
STAGE2 = dict(STAGE1, sub_name='ijb_s2', stage1_sub_name='ijb_s1', head_type='IoMHead', m=16, q=4,
              loss_fun='batch_hard_triplet', classes_per_batch=2, samples_per_class=4)


def synthetic_faces(gids, ks):
    """BGR 112x112 synthetic faces (ArcFace-like crops) from data/make_synthetic_faces.py."""
    spec = importlib.util.spec_from_file_location(
        'make_synthetic_faces', os.path.join(ROOT, 'data', 'make_synthetic_faces.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.draw_images(SEED, 'lfw', np.asarray(gids), np.asarray(ks))[0]


def place_in_photo(face, rng):
    """Put a 112x112 crop into a larger photo by a random similarity: (photo, its five points).

    The synthetic crops are drawn to ArcFace's layout, so the template's points, carried by the
    same transform, are the face's landmarks in the photo."""
    scale, angle = rng.uniform(1.1, 1.6), np.deg2rad(rng.uniform(-15, 15))
    width, height = int(rng.integers(170, 220)), int(rng.integers(190, 240))
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([width, height]) / 2 + rng.uniform(-10, 10, 2)
    matrix = np.c_[rot, centre - rot @ [56.0, 56.0]]
    photo = cv2.warpAffine(face, matrix, (width, height), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
    points = ARCFACE_TEMPLATE.astype(np.float64) @ rot.T + matrix[:, 2]
    return photo, points


def make_ijb_set(root, dataset='IJBC', n_ids=N_IDS):
    """A tiny IJB release: per identity two templates of several media (one a single image),
    every template pair labelled. Returns the aligned-crop originals by image name."""
    rng = np.random.default_rng(SEED)
    base = os.path.join(root, dataset)
    os.makedirs(os.path.join(base, 'meta'))
    os.makedirs(os.path.join(base, 'loose_crop'))
    # (template, media, picture k) per image: two media of two frames and one of a single image.
    layout = [(0, 0, 0), (0, 0, 1), (0, 1, 2), (1, 2, 3), (1, 3, 4), (1, 3, 5)]
    gids = np.repeat(np.arange(n_ids) + 1000, len(layout))
    ks = np.tile([k for _, _, k in layout], n_ids)
    faces = synthetic_faces(gids, ks)
    tid_mid, landmarks, originals = [], [], {}
    for i, (gid, face) in enumerate(zip(gids, faces)):
        t, m, _ = layout[i % len(layout)]
        template, media = 100 + 7 * (2 * (gid - 1000) + t), 5000 + 10 * (gid - 1000) + m
        name = f'{i + 1}.jpg'
        photo, points = place_in_photo(face, rng)
        cv2.imwrite(os.path.join(base, 'loose_crop', name), photo, [cv2.IMWRITE_JPEG_QUALITY, 95])
        originals[name] = face
        tid_mid.append(f'{name} {template} {media}')
        fields = ' '.join(f'{v:.3f}' for v in points.ravel())
        landmarks.append(f'{name} {fields} {rng.uniform(0.6, 1.0):.5f}')
    templates = sorted({int(line.split()[1]) for line in tid_mid})
    pairs = [f'{a} {b} {int((a - 100) // 14 == (b - 100) // 14)}'
             for n, a in enumerate(templates) for b in templates[n + 1:]]
    prefix = os.path.join(base, 'meta', dataset.lower())
    for suffix, lines in (('face_tid_mid', tid_mid), ('name_5pts_score', landmarks),
                          ('template_pair_label', pairs)):
        with open(f'{prefix}_{suffix}.txt', 'w') as fh:
            fh.write('\n'.join(lines) + '\n')
    return originals


@pytest.fixture(scope='module')
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('IJB_release')
    return root, make_ijb_set(str(root))


# ---------------------------------------------------------------------------------------------
# Pooling, scores, TAR@FAR
def _random_images(rng, n=400, n_templates=40, dim=16):
    templates = np.r_[np.arange(n_templates), rng.integers(0, n_templates, n - n_templates)] * 3
    medias = rng.integers(0, 60, n)  # media ids shared across templates, as in IJB
    return (rng.standard_normal((n, dim)).astype(np.float32), templates, medias,
            rng.uniform(0.3, 1.0, n).astype(np.float32))


@pytest.mark.parametrize('use_faceness', [True, False])
def test_template_features_match_the_plain_loop(use_faceness):
    feats, templates, medias, faceness = _random_images(np.random.default_rng(0))
    faceness = faceness if use_faceness else None
    ids, pooled = ijb.template_features(feats, templates, medias, faceness)
    ref_ids, ref = ijb.template_features_loop(feats, templates, medias, faceness)
    assert np.array_equal(ids, np.unique(templates)) and np.array_equal(ids, ref_ids)
    np.testing.assert_allclose(pooled, ref, atol=2e-6)
    # By hand for one template: a two-image media (faceness-weighted mean) plus a single image.
    f = np.array([[1, 0], [0, 1], [3, 4]], np.float32)
    ids, pooled = ijb.template_features(f, [7, 7, 7], [1, 1, 2], [1.0, 0.5, 0.2])
    expected = np.array([0.5, 0.25]) + np.array([0.6, 0.8])
    np.testing.assert_allclose(pooled[0], expected / np.linalg.norm(expected), rtol=1e-6)


def test_pair_scores_cosine_both_paths_and_hamming(monkeypatch):
    rng = np.random.default_rng(1)
    ids = np.array([3, 10, 11, 40, 1000])
    feats = rng.standard_normal((5, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    pairs = rng.choice(ids, (300, 2))
    rows = np.searchsorted(ids, pairs)
    direct = (feats[rows[:, 0]] * feats[rows[:, 1]]).sum(1)
    np.testing.assert_allclose(ijb.pair_scores(feats, ids, pairs), direct, atol=1e-6)
    monkeypatch.setattr(ijb, '_GEMM_ENTRIES_PER_PAIR', 0)  # force the row-gather path
    np.testing.assert_allclose(ijb.pair_scores(feats, ids, pairs), direct, atol=1e-6)
    for m, q in ((13, 4), (9, 200), (16, 300)):  # 4-bit and 8-bit fields (padded), wide codes
        codes = rng.integers(0, q, (5, m))
        expected = (codes[rows[:, 0]] == codes[rows[:, 1]]).sum(1)
        assert np.array_equal(ijb.pair_scores(codes, ids, pairs, 'Hamming'), expected)
    with pytest.raises(UserError, match='line 2: template 5 has no image'):
        ijb.pair_scores(feats, ids, [[3, 10], [5, 3]])


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_tar_at_far_equals_a_direct_count_with_ties(dtype):
    rng = np.random.default_rng(2)
    labels = rng.random(3000) < 0.2
    scores = np.round(rng.normal(0, 1, 3000) + 1.5 * labels, 1).astype(dtype)  # many ties
    fars = (1e-3, 1e-2, 0.05, 0.1, 0.5)
    tars, roc = ijb.tar_at_far(scores, labels, fars)
    pos, neg = scores[labels], scores[~labels]
    for far in fars:
        best = 0.0
        for t in np.unique(scores):  # accept score >= t
            if (neg >= t).sum() / neg.size <= far:
                best = max(best, (pos >= t).sum() / pos.size)
        assert tars[far] == best
    assert roc['far'][0] == 0 and roc['tar'][-1] == 1 and roc['threshold'][0] == np.inf
    assert roc['far'].size == np.unique(scores).size + 1


# ---------------------------------------------------------------------------------------------
# Readers
def _broken_copy(src_root, tmp_path, file_suffix, text):
    root = tmp_path / 'broken'
    shutil.copytree(src_root, root)
    path = root / 'IJBC' / 'meta' / f'ijbc_{file_suffix}.txt'
    path.write_text(text)
    return root, path


@pytest.mark.parametrize('suffix, text, message', [
    ('template_pair_label', '100 107 0\n100 114 x\n', 'line 2: expected 3 fields'),
    ('template_pair_label', '100 107 0\n\n100 114\n', 'line 3: expected 3 fields'),
    ('template_pair_label', '100 107 0\n100 114 2\n', 'line 2: the label must be 0 or 1'),
    ('template_pair_label', '100 107 0\n100 999 1\n', 'line 2: template 999 has no image'),
    ('template_pair_label', '', 'template pair file is empty'),
    ('face_tid_mid', '1.jpg 100 5000\nzz.jpg 100 5000\n', "no line for image 'zz.jpg'"),
    ('name_5pts_score', '1.jpg' + ' 1.0' * 11 + '\n', "no line for image '2.jpg'"),
    ('name_5pts_score', '1.jpg' + ' 1.0' * 10 + ' nan\n', 'line 1: landmarks and faceness'),
])
def test_malformed_meta_files_name_file_and_line(ijb_root, tmp_path, suffix, text, message):
    root, path = _broken_copy(ijb_root[0], tmp_path, suffix, text)
    with pytest.raises(UserError, match=message) as err:
        ijb.read_meta(str(root), 'IJBC')
    assert str(path) in str(err.value)


def test_missing_image_is_named(ijb_root, tmp_path):
    root = tmp_path / 'copy'
    shutil.copytree(ijb_root[0], root)
    os.remove(root / 'IJBC' / 'loose_crop' / '7.jpg')
    with pytest.raises(UserError, match=r"image '7.jpg' \(line 7 of .*\) not found"):
        ijb.read_meta(str(root), 'IJBC')


def test_reader_round_trip_and_alignment(ijb_root):
    root, originals = ijb_root
    meta = ijb.read_meta(str(root), 'IJBC')
    assert len(meta.names) == N_IDS * 6 and meta.landmarks.shape == (N_IDS * 6, 5, 2)
    assert meta.labels.sum() == N_IDS and meta.pairs.shape == (66, 2)
    crops = ijb.load_aligned(meta.image_dir, meta.names, meta.landmarks)
    truth = np.stack([originals[n][:, :, ::-1] for n in meta.names]).astype(np.float32) / 255
    inner = (slice(None), slice(8, 104), slice(8, 104))  # the border came from BORDER_REPLICATE
    error = np.abs(crops[inner] - truth[inner]).mean()
    shuffled = np.abs(crops[inner] - truth[::-1][inner]).mean()
    assert error < 0.03 < shuffled, (error, shuffled)


def test_feature_cache_resumes_and_refuses_another_model(ijb_root, tmp_path):
    meta = ijb.read_meta(str(ijb_root[0]), 'IJBC')
    calls = []

    def embed(batch):  # stands in for a model: mean colour of four image quadrants
        calls.append(len(batch))
        return batch.reshape(len(batch), 2, 56, 2, 56, 3).mean(axis=(2, 4)).reshape(len(batch), -1)

    cache = str(tmp_path / 'cache')
    first, reused = ijb.image_features(embed, meta, cache, 'model A', chunk_size=10,
                                       progress=False)
    assert reused == 0 and sum(calls) == 2 * len(meta.names)  # every image and its mirror
    assert sorted(os.listdir(cache)) == ['cache.json'] + [f'chunk_0000{c}.npy' for c in range(4)]
    os.remove(os.path.join(cache, 'chunk_00002.npy'))  # as if the run was killed in that chunk
    calls.clear()
    again, reused = ijb.image_features(embed, meta, cache, 'model A', chunk_size=10,
                                       progress=False)
    assert reused == 3 and sum(calls) == 2 * 10 and np.array_equal(first, again)
    with pytest.raises(UserError, match='another model'):
        ijb.image_features(embed, meta, cache, 'model B', chunk_size=10, progress=False)
    with open(os.path.join(cache, 'chunk_00001.npy'), 'r+b') as fh:
        fh.truncate(100)  # damaged outside the program (its own writes are atomic)
    with pytest.raises(UserError, match='chunk_00001.npy: unreadable'):
        ijb.image_features(embed, meta, cache, 'model A', chunk_size=10, progress=False)


# ---------------------------------------------------------------------------------------------
# The script, end to end
def run_script(*args, cwd, expect=0):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'test_ijb.py'), *args], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """Configs and saved (untrained) stage-1 and stage-2 weights of a tiny model."""
    from modules.config import STAGE2_REQUIRED, validate_config
    from modules.models import (
        IoMFaceModel,
        arcface_from_config,
        stage1_checkpoint,
        stage2_checkpoint,
    )
    work = tmp_path_factory.mktemp('ijb_run')
    (work / 's1.yaml').write_text(yaml.safe_dump(STAGE1))
    (work / 's2.yaml').write_text(yaml.safe_dump(STAGE2))
    cfg = validate_config(STAGE2, required=STAGE2_REQUIRED)
    arcface = arcface_from_config(cfg, use_pretrain=False)
    stage1_checkpoint(arcface).save(str(work / 'checkpoints' / 'ijb_s1' / 'ckpt'))
    stage2 = IoMFaceModel(cfg, arcface)
    stage2_checkpoint(stage2).save(str(work / 'checkpoints' / 'ijb_s2' / 'ckpt'))
    return work


def test_script_float_and_iom_table_then_resume(ijb_root, workdir):
    root = str(ijb_root[0])
    out = run_script('--cfg_path', 's2.yaml', '--ijb_root', root, '--iom', '--chunk_size', '16',
                     cwd=workdir).stdout
    print(out)
    assert 'IJBC: 36 images, 12 templates, 66 pairs (6 genuine)' in out
    header = [line for line in out.splitlines() if line.startswith('| FAR')]
    assert header == ['| FAR | float (cosine) | IoM m=16 q=4 (Hamming) |']
    rows = [line for line in out.splitlines() if line.startswith('| 1e-0')]
    assert [r.split()[1] for r in rows] == ['1e-06', '1e-05', '1e-04', '1e-03', '1e-02', '1e-01']
    logs = workdir / 'logs' / 'ijb_s2'
    with open(logs / 'ijb_IJBC_results.json') as fh:
        summary = json.load(fh)
    assert (logs / 'ijb_IJBC_roc.png').stat().st_size > 1000
    # The reported figures are those of the cached features, pooled and scored again here.
    cache = logs / 'ijb_IJBC_features'
    feats = np.concatenate([np.load(cache / f'chunk_0000{c}.npy') for c in range(3)])
    meta = ijb.read_meta(root, 'IJBC')
    ids, templates = ijb.template_features(feats, meta.templates, meta.medias, meta.faceness)
    tars, _ = ijb.tar_at_far(ijb.pair_scores(templates, ids, meta.pairs), meta.labels)
    assert summary['tar_at_far']['float (cosine)'] == {f'{k:.0e}': v for k, v in tars.items()}
    assert set(summary['tar_at_far']) == {'float (cosine)', 'IoM m=16 q=4 (Hamming)'}

    # The float-only run of the stage-1 model finds the same features cached (the killed-run
    # case: the last chunk is missing) and embeds only that chunk.
    s1_cache = workdir / 'logs' / 'ijb_s1' / 'ijb_IJBC_features'
    shutil.copytree(cache, s1_cache)
    os.remove(s1_cache / 'chunk_00002.npy')
    out = run_script('--cfg_path', 's1.yaml', '--ijb_root', root, '--chunk_size', '16',
                     cwd=workdir).stdout
    assert 'resumed: 2 feature chunk(s)' in out
    with open(workdir / 'logs' / 'ijb_s1' / 'ijb_IJBC_results.json') as fh:
        again = json.load(fh)['tar_at_far']
    assert again == {'float (cosine)': summary['tar_at_far']['float (cosine)']}


def test_script_bad_meta_file_is_one_line_exit_2(ijb_root, tmp_path):
    root, _ = _broken_copy(ijb_root[0], tmp_path, 'template_pair_label', '100 107 0\n1 2\n')
    proc = run_script('--cfg_path', os.path.join(ROOT, 'configs', 'arc_res50.yaml'),
                      '--ijb_root', str(root), cwd=tmp_path, expect=2)
    assert proc.stderr.count('\n') == 1 and 'line 2: expected 3 fields' in proc.stderr
    assert not (tmp_path / 'logs').exists()
