"""Synthetic face generator: determinism, output layouts (DESIGN section 3), disjoint identities,
identity signal present but not readable off raw pixels."""
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'data', 'make_synthetic_faces.py')
SETS = (('lfw', 'lfw_align_112'), ('agedb_30', 'agedb_align_112'), ('cfp_fp', 'cfp_align_112'))
TINY = dict(num_train_ids=5, images_per_id=3, num_test_ids=4, num_pairs=8, num_retrieval_ids=3,
            retrieval_images_per_id=2)


def _load_generator():
    spec = importlib.util.spec_from_file_location('make_synthetic_faces', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


msf = _load_generator()


class _NoClassesUnpickler(pickle.Unpickler):
    """A .bin holds only lists, tuples, bytes and bools: any class lookup is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f'refused {module}.{name}')


def _read_bin(path):
    with open(path, 'rb') as fh:
        return _NoClassesUnpickler(io.BytesIO(fh.read())).load()


def _tree_bytes(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """One tiny dataset shared by the layout tests."""
    out = tmp_path_factory.mktemp('syn') / 'synthetic'
    manifest = msf.generate(str(out), seed=3, **TINY)
    return out, manifest


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny):
    out, _ = tiny
    again = tmp_path / 'again'
    msf.generate(str(again), seed=3, **TINY)
    first, second = _tree_bytes(out), _tree_bytes(again)
    assert len(first) > 30 and first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)
    other = tmp_path / 'other'
    msf.generate(str(other), seed=4, **TINY)
    third = _tree_bytes(other)
    jpgs = [k for k in first if k.endswith('.jpg')]
    assert jpgs and all(first[k] != third[k] for k in jpgs)
    assert first['test_dataset_bin/lfw.bin'] != third['test_dataset_bin/lfw.bin']


def test_training_and_retrieval_trees(tiny):
    out, manifest = tiny
    ids = sorted(os.listdir(out / 'train'))
    assert ids == [f'id_{i:05d}' for i in range(TINY['num_train_ids'])]
    for ident in ids:
        files = sorted(os.listdir(out / 'train' / ident))
        assert files == [f'{k:04d}.jpg' for k in range(TINY['images_per_id'])]
    img = cv2.imread(str(out / 'train' / ids[0] / '0000.jpg'))
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8 and img.std() > 10
    retrieval = sorted(os.listdir(out / 'retrieval'))
    assert len(retrieval) == TINY['num_retrieval_ids']
    assert all(len(os.listdir(out / 'retrieval' / r)) == TINY['retrieval_images_per_id']
               for r in retrieval)
    on_disk = json.loads((out / 'manifest.json').read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk['counts']['train_images'] == TINY['num_train_ids'] * TINY['images_per_id']


def test_verification_layouts_match_design(tiny):
    import bcolz

    out, manifest = tiny
    n = TINY['num_pairs']
    for name, folder in SETS:
        arr = bcolz.carray(rootdir=str(out / 'test_dataset' / folder / name), mode='r')
        assert arr.shape == (2 * n, 3, 112, 112) and arr.dtype == np.float32
        data = arr[:]
        assert data.min() >= -1.0 and data.max() <= 1.0 and data.std() > 0.1
        issame = np.load(out / 'test_dataset' / folder / f'{name}_list.npy')
        assert issame.dtype == bool and issame.shape == (n,) and issame.sum() == n // 2
        jpegs, bin_same = _read_bin(out / 'test_dataset_bin' / f'{name}.bin')
        assert isinstance(jpegs, list) and len(jpegs) == 2 * n
        assert isinstance(bin_same, list) and all(type(v) is bool for v in bin_same)
        assert bin_same == issame.tolist()
        # Same pictures in both layouts: bcolz holds the decoded JPEGs, BGR, (x/255-0.5)/0.5.
        decoded = np.stack([cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)
                            for j in jpegs])
        expected = (decoded.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(data, expected, atol=1e-6)
        assert manifest['counts']['verification'][name]['pairs'] == n


def test_bcolz_channel_order_is_bgr(tiny):
    import bcolz

    out, _ = tiny
    data = bcolz.carray(rootdir=str(out / 'test_dataset/lfw_align_112/lfw'), mode='r')[:2]
    jpegs, _ = _read_bin(out / 'test_dataset_bin' / 'lfw.bin')
    bgr = cv2.imdecode(np.frombuffer(jpegs[0], np.uint8), cv2.IMREAD_COLOR)
    assert not np.array_equal(bgr[..., 0], bgr[..., 2])  # else the check below is vacuous
    np.testing.assert_allclose((data[0, 0] + 1) / 2 * 255, bgr[..., 0], atol=1e-3)


def test_identity_pools_are_disjoint():
    train, test, retrieval = msf.identity_ranges(7, 5, 4)
    assert not set(train) & set(test) and not set(train) & set(retrieval)
    assert not set(test) & set(retrieval)
    for name, _ in SETS:
        gids, issame = msf.draw_pairs(0, name, test, 40)
        assert set(gids.tolist()) <= set(test.tolist())
        first, second = gids[0::2], gids[1::2]
        assert np.array_equal(first == second, issame)
    # Different sets draw different pairs.
    assert not np.array_equal(msf.draw_pairs(0, 'lfw', test, 40)[0],
                              msf.draw_pairs(0, 'agedb_30', test, 40)[0])


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError('simulated crash')

    monkeypatch.setattr(msf, '_write_verification', boom)
    with pytest.raises(RuntimeError):
        msf.generate(str(tmp_path / 'synthetic'), seed=0, **TINY)
    assert os.listdir(tmp_path) == []


def test_refuses_to_replace_foreign_folder(tmp_path):
    target = tmp_path / 'mine'
    target.mkdir()
    (target / 'precious.txt').write_text('keep me')
    with pytest.raises(msf.UserError, match='not a synthetic dataset'):
        msf.generate(str(target), seed=0, **TINY)
    assert (target / 'precious.txt').read_text() == 'keep me'
    assert sorted(os.listdir(tmp_path)) == ['mine']


def _pairwise_sq(x):
    sq = (x ** 2).sum(1)
    return np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0)


def test_identity_signal_present_but_not_in_raw_pixels():
    ids, per_id = 20, 6
    gids = np.repeat(np.arange(1000, 1000 + ids), per_id)
    images, _ = msf.draw_images(0, 'lfw', gids, np.tile(np.arange(per_id), ids))
    labels = gids
    raw = images.reshape(len(images), -1).astype(np.float64)
    same = labels[:, None] == labels[None]
    off = ~np.eye(len(labels), dtype=bool)

    # Simple measure: blurred 8x8 thumbnails are closer within an identity than across.
    thumbs = np.stack([cv2.resize(cv2.GaussianBlur(im, (0, 0), 4), (8, 8),
                                  interpolation=cv2.INTER_AREA) for im in images])
    d_thumb = np.sqrt(_pairwise_sq(thumbs.reshape(len(images), -1).astype(np.float64)))
    genuine, impostor = d_thumb[same & off].mean(), d_thumb[~same].mean()
    assert genuine < 0.93 * impostor, (genuine, impostor)

    # Raw-pixel nearest neighbour must be far from solving identification.
    d_raw = _pairwise_sq(raw)
    np.fill_diagonal(d_raw, np.inf)
    rank1 = np.mean(labels[d_raw.argmin(1)] == labels)
    assert 1.0 / ids < rank1 < 0.6, rank1

    # And raw-pixel distance with the best possible threshold is a poor verifier.
    iu = np.triu_indices(len(labels), 1)
    d, s = np.sqrt(d_raw[iu]), same[iu]
    order = np.argsort(d)
    ss = s[order]
    # Balanced accuracy so the many impostor pairs do not dominate.
    tpr = np.cumsum(ss) / ss.sum()
    tnr = 1 - np.cumsum(~ss) / (~ss).sum()
    best = ((tpr + tnr) / 2).max()
    assert best < 0.85, best
    print(f'thumb L2 genuine {genuine:.1f} impostor {impostor:.1f}; raw NN rank-1 {rank1:.3f}; '
          f'raw best balanced verification accuracy {best:.3f}')


def test_profile_set_turns_the_second_image():
    """Yaw moves the inner features sideways: a turned render differs clearly from the frontal."""
    p = msf.identity_params(0, 5)
    base = msf.image_nuisance(np.random.default_rng(0), 'cfp_fp', yaw=0.0)
    turned = dict(base, yaw=0.5)
    a = msf.render_geometry(p, base).astype(np.float64)
    b = msf.render_geometry(p, turned).astype(np.float64)
    assert np.abs(a - b).mean() > 5


def test_cli_summary_and_bad_flags(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = tmp_path / 'cli'
    args = [sys.executable, SCRIPT, f'--output_dir={out}', '--num_train_ids=2',
            '--images_per_id=2', '--num_test_ids=2', '--num_pairs=4', '--num_retrieval_ids=1',
            '--retrieval_images_per_id=1']
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('synthetic faces: 2 train ids')
    assert (out / 'manifest.json').is_file()
    bad = subprocess.run(args[:-1] + ['--num_pairs=5'], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and 'num_pairs must be even' in bad.stderr

