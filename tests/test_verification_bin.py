"""data/make_verification_bin.py on tiny made-up LFW and CFP layouts: pair order, folds, the
fallback counted, landmarks, and a missing photo named in one line with nothing written."""
import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from modules.align import ARCFACE_TEMPLATE, align_face, box_crop, detect_faces, read_photo
from modules.testsets import load_verification_set
from modules.utils import UserError
from modules.verification_bin import make_verification_bin, read_cfp_pairs, read_lfw_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE_HOPPER = os.path.join(os.path.dirname(__import__('matplotlib').__file__), 'mpl-data',
                            'sample_data', 'grace_hopper.jpg')


def hopper_photos():
    """Five small photos: three views of the face with room around it, a crop so tight that
    MTCNN misses it without a border, and a blank photo (no face at all)."""
    image = read_photo(GRACE_HOPPER)
    x, y, w, h = detect_faces(image)[0]['box']
    cx, cy = x + w / 2, y + h / 2

    def crop(scale, width):
        half_w, half_h = w * scale / 2, h * scale / 2
        part = image[int(cy - half_h):int(cy + half_h), int(cx - half_w):int(cx + half_w)]
        return cv2.resize(part, (width, round(width * part.shape[0] / part.shape[1])))

    return {'wide': crop(1.6, 90), 'wider': crop(2.0, 110), 'mirror': crop(1.6, 90)[:, ::-1],
            'tight': crop(0.8, 60), 'blank': np.full((80, 70, 3), 200, np.uint8)}


def write(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))


# LFW layout: 3 people; View-2 style file with 10 folds of 1 same + 1 different pair.
LFW_PHOTOS = {('Ann', 1): 'wide', ('Ann', 2): 'mirror', ('Bob', 1): 'wider', ('Bob', 2): 'tight',
              ('Cid', 1): 'blank'}
LFW_FOLDS = [(('Ann', 1, 2), ('Ann', 1, 'Cid', 1)), (('Bob', 1, 2), ('Bob', 2, 'Ann', 2))] * 5


@pytest.fixture(scope='module')
def lfw(tmp_path_factory):
    """A tiny LFW (images + pairs.txt) and what make_verification_bin made of it."""
    base = tmp_path_factory.mktemp('lfw')
    photos = hopper_photos()
    for (name, number), kind in LFW_PHOTOS.items():
        write(base / 'lfw' / name / f'{name}_{number:04d}.jpg', photos[kind])
    lines = ['10 1']
    for same, diff in LFW_FOLDS:
        lines += [' '.join(map(str, same)), ' '.join(map(str, diff))]
    (base / 'pairs.txt').write_text('\n'.join(lines) + '\n')
    report = make_verification_bin('lfw', str(base / 'out'), images=str(base / 'lfw'),
                                   pairs_path=str(base / 'pairs.txt'), progress=False)
    return base, report


def test_lfw_pairs_keep_the_file_order_and_folds(lfw):
    base, report = lfw
    images, issame = load_verification_set(str(base / 'out'), 'lfw')
    assert images.shape == (40, 112, 112, 3)
    np.testing.assert_array_equal(issame, [True, False] * 10)
    expected = []
    for same, diff in LFW_FOLDS:
        expected += [(same[0], same[1]), (same[0], same[2]), (diff[0], diff[1]), (diff[2], diff[3])]
    # Slots of one photo hold the same crop; slots of different photos do not.
    for a in range(40):
        for b in range(a + 1, 40):
            identical = np.array_equal(images[a], images[b])
            assert identical == (expected[a] == expected[b]), (a, b, expected[a], expected[b])
    pairs = read_lfw_pairs(str(base / 'pairs.txt'), str(base / 'lfw'))
    assert pairs.fold_sizes == [2] * 10


def test_lfw_fallback_and_padding_are_counted_and_reported(lfw):
    base, report = lfw
    assert report.pairs == 20 and report.photos == 5
    assert report.how == {'detected': 3, 'padded': 1, 'fallback': 1}
    assert report.line().startswith('20 pairs (5 photos: 3 detected, 1 padded, 1 fallback) in ')
    with open(base / 'out' / 'lfw_report.csv') as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ['photo', 'aligned_by']
    assert sorted((os.path.basename(p), how) for p, how in rows[1:]) == [
        ('Bob_0002.jpg', 'padded'), ('Cid_0001.jpg', 'fallback')]


def test_fail_stops_at_the_photo_without_a_face(lfw, tmp_path):
    base, _ = lfw
    with pytest.raises(UserError, match=r'Cid_0001\.jpg: no face found .* --fail is set; nothing '
                       'written'):
        make_verification_bin('lfw', str(tmp_path / 'out'), images=str(base / 'lfw'),
                              pairs_path=str(base / 'pairs.txt'), fail=True, progress=False)
    assert not (tmp_path / 'out').exists() or os.listdir(tmp_path / 'out') == []


def test_a_dead_worker_is_one_error_and_nothing_written(lfw, tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    import modules.align

    class DeadPool:
        def map(self, fn, args, chunksize=1):
            yield fn(next(iter(args)))
            raise BrokenProcessPool('a worker was killed')

        def shutdown(self, cancel_futures=False):
            pass

    monkeypatch.setattr(modules.align, 'process_pool', lambda workers: DeadPool())
    base, _ = lfw
    with pytest.raises(UserError, match=r'lfw: a worker process died .* after 1 of 5 photos; '
                       'nothing written'):
        make_verification_bin('lfw', str(tmp_path / 'out'), images=str(base / 'lfw'),
                              pairs_path=str(base / 'pairs.txt'), workers=2, progress=False)
    assert not (tmp_path / 'out').exists()


# CFP layout: 3 identities, frontal 01-02 and profile 01 each; FP and FF with 10 folds of 1 + 1.
def make_cfp(base):
    """A tiny CFP tree with Pair_list_F/P.txt, Split/FP|FF and a five-point landmarks file."""
    rng = np.random.default_rng(0)
    frontal, profile, marks = [], [], []
    for person in (1, 2, 3):
        for view, count, listing in (('frontal', 2, frontal), ('profile', 1, profile)):
            for n in range(1, count + 1):
                rel = f'Data/Images/{person:03d}/{view}/{n:02d}.jpg'
                write(base / rel, rng.integers(0, 255, (60, 50, 3), np.uint8))
                listing.append(rel)
                points = ARCFACE_TEMPLATE * 0.4 + rng.uniform(0, 4, 2)
                marks.append(rel + ' ' + ' '.join(f'{v:.3f}' for v in points.ravel()))
    protocol = base / 'Protocol'
    protocol.mkdir(parents=True)
    for name, listing in (('F', frontal), ('P', profile)):
        (protocol / f'Pair_list_{name}.txt').write_text(
            ''.join(f'{k} ../{rel}\n' for k, rel in enumerate(listing, 1)))
    for split, second in (('FP', (1, 2, 3)), ('FF', (2, 4, 6))):
        for fold in range(1, 11):
            folder = protocol / 'Split' / split / f'{fold:02d}'
            folder.mkdir(parents=True)
            person = (fold - 1) % 3  # F indices 2p+1, 2p+2 are person p's frontals
            other = (person + 1) % 3
            (folder / 'same.txt').write_text(f'{2 * person + 1},{second[person]}\n')
            (folder / 'diff.txt').write_text(f'{2 * person + 2},{second[other]}\n')
    (base / 'landmarks.txt').write_text('# photo x1 y1 ... x5 y5\n' + '\n'.join(marks) + '\n')
    return frontal, profile


@pytest.mark.parametrize('protocol', ['cfp_fp', 'cfp_ff'])
def test_cfp_pairs_by_landmarks_in_protocol_order(tmp_path, protocol):
    frontal, profile = make_cfp(tmp_path / 'cfp')
    second = profile if protocol == 'cfp_fp' else frontal
    index = {'cfp_fp': (1, 2, 3), 'cfp_ff': (2, 4, 6)}[protocol]
    report = make_verification_bin(protocol, str(tmp_path / 'out'), root=str(tmp_path / 'cfp'),
                                   landmarks_path=str(tmp_path / 'cfp' / 'landmarks.txt'),
                                   progress=False)
    assert report.how == {'landmarks': report.photos} and report.pairs == 20
    images, issame = load_verification_set(str(tmp_path / 'out'), protocol)
    np.testing.assert_array_equal(issame, [True, False] * 10)
    marks = {}
    for line in (tmp_path / 'cfp' / 'landmarks.txt').read_text().splitlines()[1:]:
        rel, *values = line.split()
        marks[rel] = np.array(values, np.float32).reshape(5, 2)
    for fold in range(10):
        person = fold % 3
        other = (person + 1) % 3
        expected = [frontal[2 * person], second[index[person] - 1],
                    frontal[2 * person + 1], second[index[other] - 1]]
        for slot, rel in enumerate(expected):
            crop = align_face(read_photo(str(tmp_path / 'cfp' / rel)), marks[rel])
            got = images[4 * fold + slot] * 255
            # Equal up to JPEG: the packed crop is the landmark alignment of the expected photo.
            assert np.abs(got - crop).mean() < 6, (protocol, fold, slot, rel)


def test_held_out_folds_of_cropped_photos(tmp_path):
    frontal, profile = make_cfp(tmp_path / 'cfp')
    report = make_verification_bin('cfp_fp', str(tmp_path / 'out'), root=str(tmp_path / 'cfp'),
                                   progress=False, folds=[10, 2], cropped=True)
    assert report.how == {'cropped': 7} and report.pairs == 4
    images, issame = load_verification_set(str(tmp_path / 'out'), 'cfp_fp')
    np.testing.assert_array_equal(issame, [True, False, True, False])
    # Fold 02 (person 1) before fold 10 (person 0): the file's order, each photo resized whole.
    expected = [frontal[2], profile[1], frontal[3], profile[2],
                frontal[0], profile[0], frontal[1], profile[1]]
    for slot, rel in enumerate(expected):
        crop = box_crop(read_photo(str(tmp_path / 'cfp' / rel)))
        assert np.abs(images[slot] * 255 - crop).mean() < 6, (slot, rel)
    with pytest.raises(UserError, match='--folds 11: .* has folds 1..10'):
        make_verification_bin('cfp_fp', str(tmp_path / 'o2'), root=str(tmp_path / 'cfp'),
                              progress=False, folds=[11], cropped=True)


def test_missing_photo_is_one_line_exit_2_and_nothing_written(tmp_path):
    make_cfp(tmp_path / 'cfp')
    os.remove(tmp_path / 'cfp' / 'Data/Images/002/profile/01.jpg')
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'data', 'make_verification_bin.py'), '--protocol',
         'cfp_fp', '--root', str(tmp_path / 'cfp'), '--output_dir', str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    # Profile 2 is first used by the different pair of fold 01.
    assert proc.stderr.strip().splitlines() == [
        f'error: {tmp_path}/cfp/Data/Images/002/profile/01.jpg: photo not found (pair at '
        f'{tmp_path}/cfp/Protocol/Split/FP/01/diff.txt:1); nothing written']
    assert not out.exists()


@pytest.mark.parametrize('edit, message', [
    (lambda p: (p / 'Protocol/Split/FP/03/diff.txt').write_text('2,1\n4,2\n'),
     r'folds of different sizes \[2, 2, 3, 2'),
    (lambda p: (p / 'Protocol/Split/FP/01/same.txt').write_text('1;1\n'),
     r'FP/01/same\.txt:1: expected "i,j"'),
    (lambda p: (p / 'Protocol/Split/FP/01/same.txt').write_text('9,1\n'),
     r'FP/01/same\.txt:1: frontal index 9 is not in Pair_list_F\.txt'),
])
def test_bad_cfp_protocol_is_named(tmp_path, edit, message):
    make_cfp(tmp_path / 'cfp')
    edit(tmp_path / 'cfp')
    with pytest.raises(UserError, match=message):
        pairs = read_cfp_pairs(str(tmp_path / 'cfp'), 'cfp_fp')
        from modules.verification_bin import check_folds
        check_folds(pairs, 'cfp')


def test_bad_lfw_pairs_are_named(tmp_path):
    (tmp_path / 'pairs.txt').write_text('1 1\nAnn 1 2\nAnn 1 2\n')
    with pytest.raises(UserError, match=r'pairs\.txt:3: expected "name1 i name2 j" \(different\) '
                       'at this place of fold 1'):
        read_lfw_pairs(str(tmp_path / 'pairs.txt'), str(tmp_path))
    (tmp_path / 'pairs.txt').write_text('10 300\nAnn 1 2\n')
    with pytest.raises(UserError, match='announces 10 folds of 300 same'):
        read_lfw_pairs(str(tmp_path / 'pairs.txt'), str(tmp_path))
