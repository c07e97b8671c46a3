"""Training data: identity folders, TFRecord conversion (both flavours), stage-1 and PK batches."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow as tf
import yaml

from modules import dataset as ds
from modules import pk_sampling as pk
from modules import tfrecords as tfr
from modules.config import STAGE1_REQUIRED
from modules.utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ('zed', 'amy', 'mia')  # created unsorted: labels must follow the sorted names
SORTED = sorted(NAMES)


def _face(label, j, size=(112, 112)):
    """A smooth, distinct test image (JPEG keeps smooth images close to the source)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 120 + 40 * label, yy / h * 120 + 30 * j,
                     (xx + yy) / (h + w) * 100 + 60 + 20 * label], axis=-1)
    return np.clip(base, 0, 255).astype(np.uint8)


def _make_tree(root, names=NAMES, per_id=3):
    for name in names:
        os.makedirs(root / name)
        for j in range(per_id):
            cv2.imwrite(str(root / name / f'{j}.jpg'), _face(SORTED.index(name) if name in SORTED
                                                             else 0, j))
    return root


def _read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """3 identities x 3 images, a garbage and a truncated JPEG, an empty folder, stray files."""
    root = _make_tree(tmp_path_factory.mktemp('ids'))
    (root / 'amy' / 'broken.jpg').write_bytes(b'definitely not a jpeg')
    good = (root / 'zed' / '0.jpg').read_bytes()
    (root / 'mia' / 'truncated.jpg').write_bytes(good[:len(good) // 2])
    (root / 'zed' / 'readme.txt').write_text('not an image')
    (root / 'notes.txt').write_text('stray file at the root')
    os.makedirs(root / 'empty_one')
    return root


@pytest.fixture(scope='module')
def records(tree, tmp_path_factory):
    """Both TFRecord flavours of `tree`, with their conversion stats."""
    out = tmp_path_factory.mktemp('records')
    result = {}
    for binary in (True, False):
        path = str(out / f'train_{binary}.tfrecord')
        result[binary] = (path, tfr.write_tfrecord(str(tree), path, binary=binary, seed=3))
    return result


# ---------------------------------------------------------------------------------------------
def test_list_identity_folders_labels_follow_sorted_names(tree, capsys):
    folders = ds.list_identity_folders(str(tree), 'jpg')
    assert folders.names == SORTED
    assert folders.empty_folders == ['empty_one']
    assert 'empty_one' in capsys.readouterr().err
    assert folders.num_identities == 3 and folders.num_images == 11  # listing does not decode
    for i in range(folders.num_images):
        identity = os.fsdecode(folders.rel_paths[i]).split('/')[0]
        assert folders.labels[i] == SORTED.index(identity)
        assert os.path.isfile(folders.path(i))
    assert folders.labels.dtype == np.int64


def test_missing_or_empty_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match='not found'):
        ds.list_identity_folders(str(tmp_path / 'nope'))
    with pytest.raises(UserError, match='no identity folders'):
        ds.list_identity_folders(str(tmp_path))
    os.makedirs(tmp_path / 'a')
    os.makedirs(tmp_path / 'b')
    with pytest.raises(UserError, match='none of the 2 identity folders'):
        ds.list_identity_folders(str(tmp_path))
    (tmp_path / 'file.jpg').write_bytes(b'x')
    with pytest.raises(UserError, match='not a folder'):
        ds.list_identity_folders(str(tmp_path / 'file.jpg'))
    out = tmp_path / 'out.tfrecord'
    with pytest.raises(UserError):
        tfr.write_tfrecord(str(tmp_path / 'nope'), str(out), binary=True)
    assert not out.exists()


def test_all_images_corrupt_writes_nothing(tmp_path):
    os.makedirs(tmp_path / 'ids' / 'x')
    (tmp_path / 'ids' / 'x' / '0.jpg').write_bytes(b'\xff\xd8 garbage')
    out = tmp_path / 'out.tfrecord'
    with pytest.raises(UserError, match='could be decoded'):
        tfr.write_tfrecord(str(tmp_path / 'ids'), str(out), binary=True)
    assert os.listdir(tmp_path) == ['ids']  # neither the output nor a temp file


@pytest.mark.parametrize('binary', [True, False])
def test_tfrecord_round_trip(tree, records, binary):
    path, stats = records[binary]
    assert stats['identities'] == 3 and stats['images'] == 9 and stats['skipped'] == 2
    assert sorted(stats['skipped_paths']) == [str(tree / 'amy' / 'broken.jpg'),
                                              str(tree / 'mia' / 'truncated.jpg')]
    assert ds.count_tfrecord(path) == 9

    raw = [tf.train.Example.FromString(r.numpy()).features.feature
           for r in tf.data.TFRecordDataset(path)]
    key = 'image/filename' if binary else 'image/img_path'
    names = [f[key].bytes_list.value[0].decode() for f in raw]
    file_labels = [f['image/source_id'].int64_list.value[0] for f in raw]
    if binary:
        assert raw[0]['image/encoded'].bytes_list.value[0] == (tree / names[0]).read_bytes()
        sources = [tree / n for n in names]
    else:
        assert all(os.path.isabs(n) for n in names)
        sources = names
    assert [SORTED.index(os.path.basename(os.path.dirname(s))) for s in sources] == file_labels
    assert file_labels != sorted(file_labels)  # the record order is shuffled

    data = ds.load_tfrecord_dataset(path, 9, binary_img=binary, shuffle=False, augment=False,
                                    repeat=False)
    batches = list(data)
    assert len(batches) == 1
    images, labels = batches[0][0].numpy(), batches[0][1].numpy()
    assert images.shape == (9, 112, 112, 3) and images.dtype == np.float32
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, file_labels)  # shuffle=False keeps the file order
    expected = np.stack([_read_rgb(s) for s in sources])
    diff = np.abs(images - expected)
    assert diff.mean() < 0.01 and diff.max() < 0.1  # two JPEG decoders, same bytes


def test_binary_img_mismatch_and_bad_files_are_user_errors(records, tmp_path):
    binary_path = records[True][0]
    with pytest.raises(UserError, match='binary_img: False'):
        ds.load_tfrecord_dataset(binary_path, 4, binary_img=False)
    with pytest.raises(UserError, match='not found'):
        ds.load_tfrecord_dataset(str(tmp_path / 'missing.tfrecord'), 4)
    junk = tmp_path / 'junk.tfrecord'
    junk.write_bytes(b'this is not a tfrecord file at all')
    with pytest.raises(UserError, match='not a TFRecord'):
        ds.load_tfrecord_dataset(str(junk), 4)


def test_interrupted_conversion_leaves_no_partial_file(tree, tmp_path, monkeypatch):
    out = tmp_path / 'train.tfrecord'
    out.write_bytes(b'previous good file')
    calls = []
    original = tfr.check_image_file

    def interrupted(path):
        calls.append(path)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return original(path)

    monkeypatch.setattr(tfr, 'check_image_file', interrupted)
    with pytest.raises(KeyboardInterrupt):
        tfr.write_tfrecord(str(tree), str(out), binary=True)
    assert out.read_bytes() == b'previous good file'
    assert os.listdir(tmp_path) == ['train.tfrecord']


def test_augmentation_range_shape_and_seed(records):
    path = records[True][0]

    def first(**kwargs):
        data = ds.load_tfrecord_dataset(path, 4, buffer_size=16, **kwargs)
        return [t.numpy() for t in next(iter(data))]

    aug, labels = first(seed=7)
    assert aug.shape == (4, 112, 112, 3) and aug.dtype == np.float32 and labels.shape == (4,)
    assert aug.min() >= 0.0 and aug.max() <= 1.0
    again, labels_again = first(seed=7)
    np.testing.assert_array_equal(aug, again)  # seeded: same order and same augmentation
    np.testing.assert_array_equal(labels, labels_again)
    other, _ = first(seed=8)
    assert not np.array_equal(aug, other)

    # Random horizontal flips: the red ramp of _face runs the other way in some images only.
    face = tf.convert_to_tensor(_face(0, 0).astype(np.float32) / 255.0)
    outs = np.stack([ds._transform(face, tf.constant([s, 1], tf.int64), True, False).numpy()
                     for s in range(16)])
    mirrored = outs[:, :, :56, 0].mean(axis=(1, 2)) > outs[:, :, 56:, 0].mean(axis=(1, 2))
    assert 2 <= mirrored.sum() <= 14
    assert outs.shape == (16, 112, 112, 3) and 0.0 <= outs.min() <= outs.max() <= 1.0

    plain, plain_labels = first(seed=7, augment=False, shuffle=False)
    ccrop, _ = first(seed=7, augment=False, shuffle=False, is_ccrop=True)
    # Central crop = resize to 128 and keep the middle 112x112.
    want = tf.image.resize(plain, (128, 128)).numpy()[:, 8:120, 8:120]
    np.testing.assert_allclose(ccrop, np.clip(want, 0, 1), atol=0.03)
    assert np.abs(ccrop - plain).mean() > 0.01


# ---------------------------------------------------------------------------------------------
def _pk_labels():
    # ids 10..17: counts 6, 5, 4, 4, 3, 2, 1, 1 (non-contiguous ids, two single-image identities)
    counts = {10: 6, 11: 5, 12: 4, 13: 4, 14: 3, 15: 2, 16: 1, 17: 1}
    labels = np.concatenate([np.full(c, i) for i, c in counts.items()])
    return np.random.default_rng(0).permutation(labels), counts


def test_pk_batches_have_p_identities_times_k_samples():
    labels, counts = _pk_labels()
    p, k = 2, 4
    batches = list(pk.pk_index_batches(labels, p, k, seed=5, epoch=0))
    assert len(batches) == 6 // p == pk.pk_steps_per_epoch(labels, p)  # 6 eligible identities
    seen = []
    for batch in batches:
        assert batch.shape == (p * k,) and batch.dtype == np.int64
        groups = labels[batch].reshape(p, k)
        assert (groups == groups[:, :1]).all()  # identity-major: K entries per identity
        ids = groups[:, 0]
        assert len(set(ids)) == p
        seen.extend(ids)
        for identity, idx in zip(ids, batch.reshape(p, k)):
            n = counts[identity]
            # K distinct images when there are enough, else every image of the identity
            assert len(set(idx)) == min(n, k)
    assert sorted(seen) == [10, 11, 12, 13, 14, 15]  # one epoch covers every eligible identity
    assert not {16, 17} & set(seen)  # single-image identities are excluded
    summary = pk.pk_summary(labels, k)
    assert summary == {'identities': 8, 'images': 26, 'eligible': 6, 'excluded_single': 2,
                       'undersized': 2}


def test_pk_epochs_differ_and_are_reproducible():
    labels, _ = _pk_labels()
    epoch0 = np.stack(list(pk.pk_index_batches(labels, 3, 2, seed=1, epoch=0)))
    epoch1 = np.stack(list(pk.pk_index_batches(labels, 3, 2, seed=1, epoch=1)))
    again = np.stack(list(pk.pk_index_batches(labels, 3, 2, seed=1, epoch=0)))
    np.testing.assert_array_equal(epoch0, again)
    assert not np.array_equal(epoch0, epoch1)
    # Over many epochs, a large identity contributes different images.
    picks = {tuple(sorted(b[labels[b] == 10]))
             for e in range(20) for b in pk.pk_index_batches(labels, 3, 2, seed=1, epoch=e)
             if (labels[b] == 10).any()}
    assert len(picks) > 3


def test_pk_rejects_impossible_batches():
    labels, _ = _pk_labels()
    with pytest.raises(UserError, match='only 6 exist'):
        pk.pk_index_batches(labels, 7, 2)
    with pytest.raises(UserError, match='positive'):
        pk.pk_index_batches(labels, 2, 0)


def test_load_pk_dataset_shapes_and_resizing(tmp_path, capsys):
    root = _make_tree(tmp_path / 'ids')
    os.makedirs(root / 'solo')
    cv2.imwrite(str(root / 'solo' / '0.jpg'), _face(0, 0))
    # VGGFace2-style image of another size: resized to 112x112
    cv2.imwrite(str(root / 'amy' / 'big.jpg'), _face(0, 3, size=(150, 130)))
    data, num_ids, num_images, steps = ds.load_pk_dataset(str(root), 2, 2, augment=False, seed=4)
    assert (num_ids, num_images, steps) == (4, 11, 1)
    assert '1 single-image identities excluded' in capsys.readouterr().out
    solo_label = sorted(NAMES + ('solo',)).index('solo')
    for images, labels in data.take(4):
        images, labels = images.numpy(), labels.numpy()
        assert images.shape == (4, 112, 112, 3) and images.dtype == np.float32
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert labels.dtype == np.int64 and labels[0] == labels[1] and labels[2] == labels[3]
        assert labels[0] != labels[2] and solo_label not in labels
    augmented = next(iter(ds.load_pk_dataset(str(root), 3, 2, seed=4)[0]))[0].numpy()
    assert augmented.shape == (6, 112, 112, 3) and 0.0 <= augmented.min() <= augmented.max() <= 1.0
    with pytest.raises(UserError, match='only 3 exist'):
        ds.load_pk_dataset(str(root), 4, 2)


# ---------------------------------------------------------------------------------------------
def _stage1_config(path, train_dataset, tmp_path):
    values = {'batch_size': 4, 'sub_name': 'check', 'backbone_type': 'ResNet50',
              'train_dataset': str(train_dataset), 'num_classes': 3, 'num_samples': 9,
              'epochs': 1, 'base_lr': 0.1, 'test_dataset': str(tmp_path), 'shuffle_buffer': 16}
    assert set(STAGE1_REQUIRED) <= set(values)
    path.write_text(yaml.safe_dump(values))
    return path


def test_check_dataset_writes_grid(records, tmp_path):
    from modules.config import load_config
    from modules.dataset_check import check_dataset

    cfg = load_config(str(_stage1_config(tmp_path / 'cfg.yaml', records[False][0], tmp_path)))
    cfg['binary_img'] = False
    out = tmp_path / 'grid.png'
    stats = check_dataset(cfg, num_batches=3, output_path=str(out))
    assert stats['batches'] == 3 and stats['image_shape'] == (4, 112, 112, 3)
    assert 0.0 <= stats['min'] <= stats['max'] <= 1.0
    assert 0 <= stats['label_min'] <= stats['label_max'] <= 2
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert cv2.imread(str(out)).shape[1] > 400  # 8 columns of images


def test_cli_convert_then_check(tree, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    record = tmp_path / 'train.tfrecord'
    convert = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'data', 'convert_train_binary_tfrecord.py'),
         f'--dataset_path={tree}', f'--output_path={record}'],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert convert.returncode == 0, convert.stderr
    assert 'num_classes: 3, num_samples: 9' in convert.stdout
    assert 'skipped 2 unreadable' in convert.stdout
    cfg = _stage1_config(tmp_path / 'cfg.yaml', record, tmp_path)
    out = tmp_path / 'check.png'
    check = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'dataset_checker.py'), f'--cfg_path={cfg}',
         '--num_batches=1', f'--output={out}'],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert check.returncode == 0, check.stderr
    assert 'images (4, 112, 112, 3) float32' in check.stdout
    assert out.read_bytes()[:4] == b'\x89PNG'
    full = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'dataset_checker.py'), f'--cfg_path={cfg}', '--full',
         f'--report={tmp_path / "report.txt"}'],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert full.returncode == 0, full.stderr  # every record decodes: exit status 0
    assert 'checked 9 images' in full.stdout and ': 0 bad' in full.stdout
    missing = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'dataset_checker.py'),
         f'--cfg_path={tmp_path / "nope.yaml"}'],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and 'config file not found' in missing.stderr
