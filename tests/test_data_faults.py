"""Training data faults: bad images are skipped and counted (or fail cleanly), cut-short TFRecords
give one clear error, dataset_checker --full reports every bad file, scripts start quietly."""
import os
import subprocess
import sys

import pytest
import yaml

from modules.config import STAGE2_REQUIRED, load_config
from modules.utils import UserError, native_log_lines_to_keep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IDS, PER_ID = 4, 6
NOISE = ('cuInit', 'cudart_stub', 'absl::InitializeLog', 'oneDNN', 'cpu_feature_guard')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """Identity folders, their binary and online TFRecords, and a cut-short copy of each."""
    from modules.tfrecords import _example, write_tfrecord
    from tests.helpers.runs import make_tree
    base = tmp_path_factory.mktemp('faults')
    make_tree(str(base / 'imgs'), NUM_IDS, PER_ID)
    paths = {}
    for binary in (True, False):
        path = str(base / f"train_{'bin' if binary else 'online'}.tfrecord")
        write_tfrecord(str(base / 'imgs'), path, binary=binary)
        raw = open(path, 'rb').read()
        (base / f"cut_{'bin' if binary else 'online'}.tfrecord").write_bytes(raw[:len(raw) // 2 - 3])
        paths[binary] = path
    # A binary record whose JPEG bytes are damaged (the converter vets images; a copy may not).
    bad_path = str(base / 'corrupt_jpeg.tfrecord')
    import tensorflow as tf
    with tf.io.TFRecordWriter(bad_path) as writer:
        for record in tf.data.TFRecordDataset(paths[True]):
            writer.write(record.numpy())
        writer.write(_example(1, True, data=b'\xff\xd8 not really a jpeg',
                              rel_path=b'id_01/bad.jpg'))
    return base


def cfg_file(tmp_path, train_dataset, **extra):
    """A tiny stage-1 (or, with IoM keys, stage-2) config written to tmp_path; its path."""
    cfg = dict(batch_size=8, sub_name='run', backbone_type='MobileNetV2', head_type='NormHead',
               use_pretrain=False, embd_shape=32, train_dataset=str(train_dataset),
               binary_img=True, num_classes=NUM_IDS, num_samples=NUM_IDS * PER_ID, epochs=100,
               base_lr=0.01, save_steps=2, max_steps=3, shuffle_buffer=64, test_dataset='unused')
    cfg.update(extra)
    path = tmp_path / 'cfg.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def stage2_cfg(tmp_path, root, **extra):
    return load_config(cfg_file(tmp_path, root, head_type='IoMHead', batch_size=6,
                                classes_per_batch=2, samples_per_class=3, m=8, q=4,
                                loss_fun='batch_all_triplet_loss', eval_batch_size=16,
                                # 4 identities: too few to hold any out for the key monitor.
                                monitor_holdout=0, **extra), STAGE2_REQUIRED)


def bad_tree(tmp_path, data):
    """A copy of the identity folders with one garbage file and one zero-byte file."""
    import shutil
    root = tmp_path / 'imgs'
    shutil.copytree(data / 'imgs', root)
    (root / 'id_01' / '2.jpg').write_bytes(b'GIF89a this is no image')
    (root / 'id_03' / '4.jpg').write_bytes(b'')
    return root


# ---------------------------------------------------------------------------------------------
# Truncated / corrupt TFRecords
@pytest.mark.parametrize('flavour', ['bin', 'online'])
def test_cut_short_tfrecord_fails_before_the_model_is_built(data, tmp_path, monkeypatch, flavour):
    from modules.training import train_stage1
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file(tmp_path, data / f'cut_{flavour}.tfrecord',
                               binary_img=flavour == 'bin'))
    with pytest.raises(UserError, match=r'cut_\w+\.tfrecord: truncated record at byte offset \d+ '
                                        r'\(record \d+\).*re-run data/convert_train'):
        train_stage1(cfg)
    assert not os.path.exists('checkpoints')  # nothing was built or written


@pytest.mark.parametrize('mode', ['eager_tf', 'fit'])
def test_cut_short_tfrecord_met_in_training_is_one_clear_error(data, tmp_path, monkeypatch, mode):
    import modules.dataset
    from modules.training import train_stage1
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(modules.dataset, 'SCAN_LIMIT_BYTES', 0)  # as for a file too big to scan
    cfg = load_config(cfg_file(tmp_path, data / 'cut_bin.tfrecord'))
    with pytest.raises(UserError, match=r'cut_bin\.tfrecord: truncated record at byte offset '
                                        r'\d+.*re-run data/convert_train'):
        train_stage1(cfg, mode)


def test_scan_names_the_first_corrupt_record(data, tmp_path):
    from modules.dataset import count_tfrecord, scan_tfrecord
    raw = bytearray((data / 'train_bin.tfrecord').read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path = tmp_path / 'flipped.tfrecord'
    path.write_bytes(bytes(raw))
    assert scan_tfrecord(str(data / 'train_bin.tfrecord')) == NUM_IDS * PER_ID
    with pytest.raises(UserError, match=r'corrupted record at byte offset \d+ \(record 1[01]\)'):
        scan_tfrecord(str(path))
    assert count_tfrecord(str(data / 'train_bin.tfrecord')) == NUM_IDS * PER_ID


# ---------------------------------------------------------------------------------------------
# Stage 1: a corrupt JPEG inside a binary record, a missing file behind an online record
def test_corrupt_jpeg_in_binary_record_is_skipped_counted_and_named(data, tmp_path, monkeypatch):
    from modules.training import train_stage1
    monkeypatch.chdir(tmp_path)
    # 4 batches of 8 need more than the 24 good records of one pass: the bad one is met.
    summary = train_stage1(load_config(cfg_file(tmp_path, data / 'corrupt_jpeg.tfrecord',
                                                max_steps=4)))
    assert summary['step'] == 4
    assert summary['bad_images'] == 1
    assert summary['bad_image_examples'] == [
        f"{data / 'corrupt_jpeg.tfrecord'} record {NUM_IDS * PER_ID} (id_01/bad.jpg): cannot be "
        'decoded (corrupt, truncated or not an image)']
    assert _scalars(os.path.join('logs', 'run'), 'data/bad_images')[-1] == 1.0


def _scalars(directory, tag):
    """Values of one TensorBoard scalar, in step order."""
    import tensorflow as tf
    values = []
    for name in sorted(os.listdir(directory)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
            values += [(event.step, float(tf.make_ndarray(v.tensor)))
                       for v in event.summary.value if v.tag == tag]
    return [value for _, value in sorted(values)]


def test_missing_file_behind_online_record(data, tmp_path, monkeypatch):
    import shutil

    from modules.dataset import BadImageError
    from modules.tfrecords import write_tfrecord
    from modules.training import train_stage1
    monkeypatch.chdir(tmp_path)
    shutil.copytree(data / 'imgs', tmp_path / 'imgs')
    write_tfrecord(str(tmp_path / 'imgs'), 'online.tfrecord', binary=False)
    missing = tmp_path / 'imgs' / 'id_02' / '3.jpg'
    missing.unlink()
    summary = train_stage1(load_config(cfg_file(tmp_path, 'online.tfrecord', binary_img=False)))
    assert summary['step'] == 3 and summary['bad_images'] == 1
    assert summary['bad_image_examples'][0].startswith(f'{missing} (online.tfrecord record ')
    assert summary['bad_image_examples'][0].endswith(': missing or unreadable file')
    cfg = load_config(cfg_file(tmp_path, 'online.tfrecord', binary_img=False, max_steps=6,
                               save_steps=100, bad_images='fail'))
    with pytest.raises(BadImageError, match=f'bad training image {missing} .*missing.*'
                                            r'last good checkpoint: .*ckpt-3'):
        train_stage1(cfg)
    assert os.path.basename(_latest('checkpoints/run')) == 'ckpt-3'


def _latest(directory):
    import tensorflow as tf
    return tf.train.latest_checkpoint(directory)


def test_fail_mode_cli_exits_2_with_one_line_and_a_quiet_start(data, tmp_path):
    """train.py as a user runs it: no start-up noise, exit 2, one line naming the record."""
    bad = cfg_file(tmp_path, data / 'corrupt_jpeg.tfrecord', max_steps=8, bad_images='fail')
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # the script's own set-up must keep it quiet
    env.pop('CUDA_VISIBLE_DEVICES', None)
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--cfg_path', bad],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert not [line for line in run.stderr.splitlines() if any(n in line for n in NOISE)]
    lines = [line for line in run.stderr.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and 'Traceback' not in run.stderr
    assert f"corrupt_jpeg.tfrecord record {NUM_IDS * PER_ID} (id_01/bad.jpg)" in lines[0]
    assert 'without saving, last good checkpoint:' in lines[0]


# ---------------------------------------------------------------------------------------------
# Stage 2: a garbage file and a zero-byte file in the identity folders
@pytest.mark.parametrize('cache', [True, False])
def test_stage2_skips_garbage_and_empty_files(data, tmp_path, monkeypatch, cache):
    from modules.training import train_stage2
    monkeypatch.chdir(tmp_path)
    root = bad_tree(tmp_path, data)
    summary = train_stage2(stage2_cfg(tmp_path, root, cache_embeddings=cache,
                                      max_steps=4 if cache else 6))
    assert summary['step'] == (4 if cache else 6)
    named = {example.split(': ')[0]: example.split(': ', 1)[1]
             for example in summary['bad_image_examples']}
    if cache:  # every image is embedded once, so both are met
        assert summary['bad_images'] == 2
        assert named == {str(root / 'id_01' / '2.jpg'): 'cannot be decoded (corrupt, truncated '
                         'or not an image)', str(root / 'id_03' / '4.jpg'): 'empty file'}
    else:  # PK sampling draws 3 of 6 images per identity: count what was met, name it right
        assert summary['bad_images'] == len(named) >= 1
        assert set(named) <= {str(root / 'id_01' / '2.jpg'), str(root / 'id_03' / '4.jpg')}


@pytest.mark.parametrize('cache', [True, False])
def test_stage2_fail_mode_names_the_file(data, tmp_path, monkeypatch, cache):
    from modules.dataset import BadImageError
    from modules.training import train_stage2
    monkeypatch.chdir(tmp_path)
    root = bad_tree(tmp_path, data)
    (root / 'id_03' / '4.jpg').unlink()
    for name in os.listdir(root / 'id_01'):  # every draw of id_01 holds the bad file
        if name not in ('2.jpg', '0.jpg', '1.jpg'):
            (root / 'id_01' / name).unlink()
    cfg = stage2_cfg(tmp_path, root, cache_embeddings=cache, max_steps=20, bad_images='fail')
    with pytest.raises(BadImageError, match=f"bad training image {root / 'id_01' / '2.jpg'}: "
                                            'cannot be decoded'):
        train_stage2(cfg)


def test_pk_batch_keeps_its_shape_when_an_image_is_bad(data, tmp_path):
    from modules.dataset import BadImages, load_pk_dataset
    root = bad_tree(tmp_path, data)
    bad = BadImages()
    dataset = load_pk_dataset(str(root), 4, 6, augment=False, bad_images=bad)[0]
    images, labels = next(iter(dataset))
    assert images.shape == (24, 112, 112, 3) and bad.count == 2
    # Bad slots hold another image of the same identity, never the all-zero placeholder.
    assert float(images.numpy().reshape(24, -1).max(axis=1).min()) > 0


def test_guarded_decode_flags_each_image_of_a_chunk(tmp_path):
    """Bad images anywhere in a chunk, or a chunk of bad images only, are flagged and zeroed."""
    import cv2
    import numpy as np
    import tensorflow as tf

    from modules.dataset import _guarded_each, _image_loader
    good, garbage, empty = tmp_path / 'good.jpg', tmp_path / 'garbage.jpg', tmp_path / 'empty.jpg'
    cv2.imwrite(str(good), np.full((112, 112, 3), 200, np.uint8))
    garbage.write_bytes(b'\xff\xd8 not a jpeg')
    empty.write_bytes(b'')
    run = tf.function(lambda paths: _guarded_each(_image_loader(False, False, from_path=True),
                                                  paths))
    names = [garbage, good, tmp_path / 'missing.jpg', good, empty]
    images, ok = (t.numpy() for t in run(tf.constant([str(n) for n in names])))
    assert ok.tolist() == [False, True, False, True, False]
    assert not images[~ok].any()
    np.testing.assert_allclose(images[ok], 200 / 255, atol=0.01)
    images, ok = run(tf.constant([str(garbage), str(empty)]))
    assert images.shape == (2, 112, 112, 3) and not ok.numpy().any() and not images.numpy().any()


# ---------------------------------------------------------------------------------------------
# dataset_checker.py --full and the quiet start
def test_full_check_reports_every_bad_file(data, tmp_path, monkeypatch):
    from modules.dataset_check import full_check
    root = bad_tree(tmp_path, data)
    (root / 'id_00' / '5.jpg').write_bytes((root / 'id_00' / '5.jpg').read_bytes()[:300])
    checked, bad = full_check({'train_dataset': str(root), 'img_ext': 'jpg'},
                              str(tmp_path / 'report.txt'))
    assert checked == NUM_IDS * PER_ID
    assert sorted(name for name, _ in bad) == sorted(
        str(root / p) for p in ('id_00/5.jpg', 'id_01/2.jpg', 'id_03/4.jpg'))
    report = (tmp_path / 'report.txt').read_text().splitlines()
    assert report[0] == f'# 3 bad of {NUM_IDS * PER_ID} images in {root}'
    assert f"{root / 'id_03' / '4.jpg'}\tempty file" in report
    checked, bad = full_check({'train_dataset': str(data / 'corrupt_jpeg.tfrecord')},
                              str(tmp_path / 'report2.txt'))
    assert checked == NUM_IDS * PER_ID + 1 and len(bad) == 1 and 'id_01/bad.jpg' in bad[0][0]


def test_dataset_checker_full_cli_on_a_cut_short_file(data, tmp_path):
    """The records before the damage are checked; the report ends with the damage and the hint."""
    cfg = cfg_file(tmp_path, data / 'cut_online.tfrecord', binary_img=False)
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop('TF_CPP_MIN_LOG_LEVEL', None)
    run = subprocess.run([sys.executable, os.path.join(ROOT, 'dataset_checker.py'), '--full',
                          '--cfg_path', cfg, '--report', 'report.txt'], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]  # bad records found: a script can tell
    assert not [line for line in run.stderr.splitlines() if any(n in line for n in NOISE)]
    readable = NUM_IDS * PER_ID // 2 - 1  # the file was cut 3 bytes short of half its records
    assert f'checked {readable} images in {data / "cut_online.tfrecord"}: 1 bad' in run.stdout
    last = (tmp_path / 'report.txt').read_text().splitlines()[-1]
    assert last.startswith(f"{data / 'cut_online.tfrecord'} record {readable}\ttruncated record "
                           'at byte offset ') and 're-run data/convert_train' in last
    assert last.count(f'record {readable}') == 1, last  # the record is named once


def test_native_log_filter_drops_start_up_noise_and_keeps_real_errors():
    lines = [b'WARNING: All log messages before absl::InitializeLog() is called are written to '
             b'STDERR\n',
             b'I0000 00:00:1795879339.852396    4414 port.cc:153] oneDNN custom operations\n',
             b'W0000 00:00:1795879339.852396    4414 foo.cc:1] a warning\n',
             b'E0000 00:00:1795879345.569711    4414 cuda_platform.cc:52] failed call to cuInit: '
             b'INTERNAL\n',
             b'E0000 00:00:1795879345.569711    4414 kernel.cc:12] a real error\n',
             b'UserWarning: something Python says\n']
    assert native_log_lines_to_keep(lines, 2) == lines[4:]
    assert native_log_lines_to_keep(lines, 0) == lines[1:3] + lines[4:]
