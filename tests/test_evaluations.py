"""Tests of the evaluation engine: metrics against sklearn and a plain loop, distances on tiny
hand-computed codes, both verification readers, the hostile-pickle guard, extraction, reports."""
import json
import os
import pickle
import struct

import cv2
import numpy as np
import pytest
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold

from modules import evaluations as E
from modules import testsets as T
from modules.utils import UserError


# ---------------------------------------------------------------------------------------------
# Verification metrics
def _random_pairs(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    dist = rng.normal(1.2, 0.25, n) - 0.45 * same
    return dist, same


def _loop_protocol(dist, same, thresholds, nrof_folds=10):
    """The 10-fold protocol written plainly: every fold, every threshold."""
    accs, thrs = [], []
    for train, test in KFold(n_splits=nrof_folds, shuffle=False).split(dist):
        train_acc = []
        for t in thresholds:
            pred = dist[train] < t
            train_acc.append(np.mean(pred == same[train]))
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean((dist[test] < best) == same[test]))
        thrs.append(best)
    return np.mean(accs), np.std(accs), np.mean(thrs)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_verification_metrics_match_plain_loop(seed):
    dist, same = _random_pairs(1003, seed)  # 1003: folds of unequal size, as KFold makes them
    res = E.verification_metrics(dist, same)
    acc, std, thr = _loop_protocol(dist, same, E.default_thresholds(dist))
    assert res['accuracy'] == pytest.approx(acc, abs=1e-12)
    assert res['accuracy_std'] == pytest.approx(std, abs=1e-12)
    assert res['threshold'] == pytest.approx(thr, abs=1e-12)


def test_verification_metrics_with_given_thresholds_and_ties():
    # Integer (Hamming-like) distances: many ties, and thresholds landing exactly on them.
    rng = np.random.default_rng(5)
    same = rng.random(600) < 0.5
    dist = rng.integers(0, 20, 600) - 6 * same + 6
    thresholds = np.arange(0, 30, 1.0)
    res = E.verification_metrics(dist, same, thresholds=thresholds)
    acc, _, thr = _loop_protocol(dist.astype(float), same, thresholds)
    assert res['accuracy'] == pytest.approx(acc, abs=1e-12)
    assert res['threshold'] == pytest.approx(thr, abs=1e-12)


def test_kfold_ids_match_sklearn():
    for n in (10, 37, 1003):
        ids = E.kfold_ids(n)
        for k, (_, test) in enumerate(KFold(n_splits=10).split(np.zeros(n))):
            np.testing.assert_array_equal(np.flatnonzero(ids == k), test)


def test_auc_and_eer_match_sklearn():
    dist, same = _random_pairs(2000, 3)
    res = E.verification_metrics(dist, same)
    assert res['auc'] == pytest.approx(roc_auc_score(same, -dist), abs=1e-10)
    fpr, tpr, _ = sk_roc_curve(same, -dist)
    eer = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    assert res['eer'] == pytest.approx(eer, abs=1e-6)
    # TAR@FAR: best TPR with FPR at most the target, from sklearn's full ROC.
    fpr_full, tpr_full, _ = sk_roc_curve(same, -dist, drop_intermediate=False)
    for far in (1e-3, 1e-4):
        assert res['tar_at_far'][far] == pytest.approx(tpr_full[fpr_full <= far].max())


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(9)
    same = rng.random(500) < 0.4
    dist = rng.integers(0, 8, 500) - 2.0 * same
    res = E.verification_metrics(dist, same)
    assert res['auc'] == pytest.approx(roc_auc_score(same, -dist), abs=1e-12)


def test_perfectly_separable_distances():
    same = np.array([True, False] * 50)
    # Genuine distances all equal: the first best threshold of any 9 folds also fits the 10th.
    dist = np.where(same, 0.2, 1.5 + np.linspace(0, 0.1, 100))
    res = E.verification_metrics(dist, same)
    assert res['accuracy'] == 1.0
    assert res['eer'] == 0.0
    assert res['auc'] == 1.0
    assert res['tar_at_far'][1e-4] == 1.0
    assert 0.2 < res['threshold'] <= 1.5


def test_hand_computed_eer_and_accuracy():
    # Genuine 0, 1, 2, 3 / impostor 1.5, 4, 5, 6 (10 pairs per fold is impossible with 8 pairs:
    # use 2 folds). Best train thresholds put d < t on {0,1,2,3} only.
    dist = np.array([0, 1, 2, 3, 1.5, 4, 5, 6], float)
    same = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    res = E.verification_metrics(dist, same, nrof_folds=2, thresholds=np.arange(0, 7, 0.5))
    # fold 0 = first 4 pairs (all genuine), fold 1 = last 4 (all impostor).
    # Train on fold 1 -> first best threshold 0.0 (no pair below) -> fold 0 accuracy 0.
    # Train on fold 0 -> first threshold with all of {0,1,2,3} below is 3.5 -> fold 1 acc 3/4.
    assert res['accuracy'] == pytest.approx(0.375)
    assert res['threshold'] == pytest.approx(1.75)
    # ROC: one impostor (1.5) sits between genuine scores 1 and 2: AUC = 1 - 2/16.
    assert res['auc'] == pytest.approx(1 - 2 / 16)
    assert res['eer'] == pytest.approx(0.25)


def test_verification_metrics_errors():
    with pytest.raises(UserError, match='genuine and impostor'):
        E.verification_metrics(np.arange(20.0), np.ones(20, bool))
    with pytest.raises(UserError, match='folds'):
        E.verification_metrics(np.arange(6.0), np.array([1, 0] * 3, bool))
    with pytest.raises(UserError, match='distances for'):
        E.verification_metrics(np.arange(20.0), np.array([1, 0] * 5, bool))


# ---------------------------------------------------------------------------------------------
# Distances
A = np.array([[0, 1, 2, 3], [7, 7, 0, 0]])
B = np.array([[0, 1, 3, 5], [7, 0, 0, 1]])


def test_hamming_and_euclidean_on_codes():
    np.testing.assert_allclose(E.pair_distances(A, B, 'Hamming'), [2, 2])
    np.testing.assert_allclose(E.pair_distances(A, B, 'Euclidean'),
                               [np.sqrt(1 + 4), np.sqrt(49 + 1)])


def test_jaccard_on_one_hot_lut():
    # Row 0: 2 shared indices of m=4 -> |A n B| = 2, |A u B| = 8 - 2 = 6.
    np.testing.assert_allclose(E.pair_distances(A, B, 'Jaccard', q=8), [1 - 2 / 6, 1 - 2 / 6])
    same = E.pair_distances(A, A, 'Jaccard', q=8)
    np.testing.assert_allclose(same, [0, 0])


def test_lut_hamming_on_bits():
    # q=8: 3 bits. Row 0: 2 vs 3 -> 010^011 = 1 bit; 3 vs 5 -> 011^101 = 2 bits -> 3.
    # Row 1: 7 vs 0 -> 3 bits; 0 vs 1 -> 1 bit -> 4.
    np.testing.assert_allclose(E.pair_distances(A, B, 'LUT', q=8), [3, 4])
    with pytest.raises(UserError, match='power of 2'):
        E.pair_distances(A, B, 'LUT', q=6)
    with pytest.raises(UserError, match='< q=4'):
        E.pair_distances(A, B, 'LUT', q=4)


def test_cosine_is_euclidean_on_normalised():
    a = np.array([[3.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 5.0], [2.0, 2.0]])
    np.testing.assert_allclose(E.pair_distances(a, b, 'cosine'), [np.sqrt(2), 0.0], atol=1e-12)


def test_code_measures_refuse_non_integer_codes():
    with pytest.raises(UserError, match='integer'):
        E.pair_distances(A + 0.5, B, 'Hamming')
    with pytest.raises(UserError, match='unknown distance measure'):
        E.pair_distances(A, B, 'manhattan')


@pytest.mark.parametrize('measure', ['cosine', 'Euclidean', 'Hamming', 'Jaccard', 'LUT'])
def test_distance_matrix_agrees_with_pair_distances(measure):
    rng = np.random.default_rng(1)
    if measure in ('cosine', 'Euclidean'):
        a, b = rng.normal(size=(5, 16)), rng.normal(size=(7, 16))
    else:
        a, b = rng.integers(0, 8, (5, 16)), rng.integers(0, 8, (7, 16))
    mat = E.distance_matrix(a, b, measure, q=8)
    assert mat.shape == (5, 7)
    ia, ib = np.meshgrid(np.arange(5), np.arange(7), indexing='ij')
    expected = E.pair_distances(a[ia.ravel()], b[ib.ravel()], measure, q=8).reshape(5, 7)
    np.testing.assert_allclose(mat, expected, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Retrieval
def test_retrieval_metrics_hand_checked():
    # 1-D embeddings; labels 0 0 1 1 1.
    x = np.array([[0.0], [1.0], [1.5], [4.0], [5.0]])
    labels = np.array([0, 0, 1, 1, 1])
    res = E.retrieval_metrics(x, labels, 'Euclidean')
    # q0 -> 1(0) 1.5(1) ...: first hit rank 1, AP 1.
    # q1 -> 1.5(1) 0(0) ...: first hit rank 2, AP 1/2.
    # q2 -> 1(0) 0(0) 4(1) 5(1): AP (1/3 + 2/4)/2 = 5/12; first hit rank 3.
    # q3 -> 5(1) 1.5(1): AP 1.  q4 -> 4(1) 1.5(1): AP 1.
    assert res['map'] == pytest.approx((1 + 0.5 + 5 / 12 + 1 + 1) / 5)
    assert res['cmc'][1] == pytest.approx(3 / 5)
    assert res['cmc'][5] == 1.0 and res['cmc'][10] == 1.0
    assert res['n_queries'] == 5


def test_retrieval_ties_ranked_by_index_and_chunking():
    codes = np.array([[0, 0], [0, 0], [0, 0], [1, 1]])
    labels = np.array([5, 7, 5, 7])
    res = E.retrieval_metrics(codes, labels, 'Hamming', q=2)
    # q0: ties 1(7), 2(5) -> index order -> hit at rank 2, AP 1/2. q1: 0(5), 2(5), 3(7): AP 1/3.
    # q2: 0(5) -> AP 1. q3: 0, 1, 2 all at distance 2 -> 1(7) at rank 2 -> AP 1/2.
    assert res['map'] == pytest.approx((0.5 + 1 / 3 + 1 + 0.5) / 4)
    assert res['cmc'][1] == pytest.approx(1 / 4)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 8)), rng.integers(0, 6, 60)
    whole = E.retrieval_metrics(x, y, 'cosine')
    chunked = E.retrieval_metrics(x, y, 'cosine', chunk_elements=100)
    assert whole['map'] == pytest.approx(chunked['map'])
    assert whole['cmc'] == chunked['cmc']


# ---------------------------------------------------------------------------------------------
# Readers
def _tiny_set(n_pairs=3, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth images so JPEG round trips stay close.
    base = rng.random((2 * n_pairs, 8, 8, 3)).astype(np.float32)
    rgb = np.stack([cv2.resize(im, (112, 112), interpolation=cv2.INTER_LINEAR) for im in base])
    issame = np.array([True, False, True][:n_pairs])
    return rgb.astype(np.float32), issame


def _write_bcolz(root, name, rgb, issame, folder=None):
    import bcolz

    folder = folder or T._BCOLZ_FOLDERS[name]
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    bgr_chw = (rgb[..., ::-1].transpose(0, 3, 1, 2) * 2.0 - 1.0).astype(np.float32)
    carr = bcolz.carray(bgr_chw, rootdir=os.path.join(root, folder, name), mode='w')
    carr.flush()
    np.save(os.path.join(root, folder, f'{name}_list.npy'), issame)


def _encode(rgb):
    bgr = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)[..., ::-1]
    return [cv2.imencode('.jpg', im, [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes() for im in bgr]


def _write_bin(path, bins, issame, protocol=4):
    with open(path, 'wb') as fh:
        fh.write(pickle.dumps((bins, issame), protocol=protocol))


def test_readers_agree(tmp_path):
    rgb, issame = _tiny_set()
    bz, bn = tmp_path / 'bcolz', tmp_path / 'bin'
    bn.mkdir()
    _write_bcolz(str(bz), 'lfw', rgb, issame)
    _write_bin(str(bn / 'lfw.bin'), _encode(rgb), [bool(s) for s in issame])
    img_a, same_a = T.load_verification_set(str(bz), 'lfw')
    img_b, same_b = T.load_verification_set(str(bn), 'lfw')
    assert img_a.shape == img_b.shape == (6, 112, 112, 3)
    assert img_a.dtype == img_b.dtype == np.float32
    np.testing.assert_allclose(img_a, rgb, atol=1e-6)  # exact layout conversion
    np.testing.assert_array_equal(same_a, issame)
    np.testing.assert_array_equal(same_b, issame)
    assert np.abs(img_a - img_b).mean() < 0.01 and np.abs(img_a - img_b).max() < 0.1
    # a channel swap would be far off: the readers agree on RGB order
    assert np.abs(img_a - img_b[..., ::-1]).mean() > 0.05


def test_bin_with_numpy_bools_protocol2_and_resize(tmp_path):
    rgb, issame = _tiny_set()
    bins = _encode(rgb)
    small = cv2.imencode('.png', np.full((56, 56, 3), 200, np.uint8))[1].tobytes()
    bins[0] = small
    _write_bin(str(tmp_path / 'cfp_fp.bin'), bins, [np.bool_(s) for s in issame], protocol=2)
    images, same = T.load_verification_set(str(tmp_path), 'cfp_fp')
    np.testing.assert_array_equal(same, issame)
    assert images.shape == (6, 112, 112, 3)
    np.testing.assert_allclose(images[0], 200 / 255, atol=1e-6)


def _py2_pickle(bins, issame):
    """What Python 2 wrote: images as `str` (BINSTRING), numpy bools via numpy globals."""
    out = [b'\x80\x02]('] + [b'T' + struct.pack('<I', len(b)) + b for b in bins] + [b'e](']
    for value in issame:
        out.append(b'cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nU\x02b1K\x00K\x01\x87R'
                   b'(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb'
                   + (b'U\x01\x01' if value else b'U\x01\x00') + b'\x86R')
    out.append(b'e\x86.')
    return b''.join(out)


def test_bin_written_by_python2(tmp_path):
    rgb, issame = _tiny_set()
    (tmp_path / 'agedb_30.bin').write_bytes(_py2_pickle(_encode(rgb), issame))
    images, same = T.load_verification_set(str(tmp_path), 'agedb_30')
    np.testing.assert_array_equal(same, issame)
    assert np.abs(images - rgb).mean() < 0.01


def test_get_val_data_all_sets_and_missing(tmp_path):
    rgb, issame = _tiny_set()
    _write_bcolz(str(tmp_path), 'lfw', rgb, issame)
    _write_bin(str(tmp_path / 'agedb_30.bin'), _encode(rgb), list(map(bool, issame)))
    with pytest.raises(UserError, match=r'cfp_fp.*cfp_align_112.*cfp_fp\.bin'):
        T.get_val_data(str(tmp_path), ['lfw', 'agedb_30', 'cfp_fp'])
    _write_bin(str(tmp_path / 'cfp_fp.bin'), _encode(rgb), list(map(bool, issame)))
    data = T.get_val_data(str(tmp_path))
    assert sorted(data) == ['agedb_30', 'cfp_fp', 'lfw']
    assert all(v[0].shape == (6, 112, 112, 3) for v in data.values())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


class _EvilSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('evil_cls', [_Evil, _EvilSystem])
def test_hostile_bin_is_refused(tmp_path, evil_cls):
    marker = tmp_path / 'pwned'
    rgb, issame = _tiny_set()
    payload = pickle.dumps((_encode(rgb), [evil_cls(str(marker))] + [True, False]))
    (tmp_path / 'lfw.bin').write_bytes(payload)
    with pytest.raises(UserError, match=r'lfw\.bin.*refusing to load global (io|builtins|posix|nt)\.'):
        T.load_verification_set(str(tmp_path), 'lfw')
    assert not marker.exists()


def test_bin_refuses_non_bool_numpy_scalar_and_other_numpy_globals(tmp_path):
    path = tmp_path / 'lfw.bin'
    path.write_bytes(pickle.dumps(([b'x', b'y'], [np.float64(1.0)])))
    with pytest.raises(UserError, match='bool'):
        T.load_verification_set(str(tmp_path), 'lfw')
    path.write_bytes(pickle.dumps(([b'x', b'y'], np.array([True]))))
    with pytest.raises(UserError, match='refusing to load global numpy'):
        T.load_verification_set(str(tmp_path), 'lfw')


def test_bcolz_wrong_shape_and_count(tmp_path):
    import bcolz

    d = tmp_path / 'lfw_align_112'
    d.mkdir()
    (tmp_path / 'cfp_align_112').mkdir()
    bcolz.carray(np.zeros((6, 3, 64, 64), np.float32), rootdir=str(d / 'lfw'), mode='w').flush()
    np.save(d / 'lfw_list.npy', np.array([True, False, True]))
    with pytest.raises(UserError, match=r'shape \(2N, 3, 112, 112\)'):
        T.load_verification_set(str(tmp_path), 'lfw')
    rgb, _ = _tiny_set()
    _write_bcolz(str(tmp_path), 'agedb_30', rgb, np.array([True, False]))
    with pytest.raises(UserError, match='6 images for 2 pairs'):
        T.load_verification_set(str(tmp_path), 'agedb_30')
    bcolz.carray(np.zeros((2, 3, 112, 112), np.int16), rootdir=str(tmp_path / 'cfp_align_112'
                                                                     / 'cfp_fp'),
                 mode='w').flush()
    np.save(tmp_path / 'cfp_align_112' / 'cfp_fp_list.npy', np.array([True]))
    with pytest.raises(UserError, match='must be float'):
        T.load_verification_set(str(tmp_path), 'cfp_fp')


def test_bcolz_missing_list(tmp_path):
    import bcolz

    (tmp_path / 'lfw_align_112').mkdir()
    bcolz.carray(np.zeros((2, 3, 112, 112), np.float32),
                 rootdir=str(tmp_path / 'lfw_align_112' / 'lfw'), mode='w').flush()
    with pytest.raises(UserError, match='lfw_list.npy'):
        T.load_verification_set(str(tmp_path), 'lfw')


def test_bin_count_mismatch_and_corrupt_image(tmp_path):
    rgb, issame = _tiny_set()
    bins = _encode(rgb)
    _write_bin(str(tmp_path / 'lfw.bin'), bins[:5], list(map(bool, issame)))
    with pytest.raises(UserError, match='5 images for 3 pairs'):
        T.load_verification_set(str(tmp_path), 'lfw')
    bins[3] = b'not an image at all'
    _write_bin(str(tmp_path / 'lfw.bin'), bins, list(map(bool, issame)))
    with pytest.raises(UserError, match=r'lfw\.bin: image 3 cannot be decoded'):
        T.load_verification_set(str(tmp_path), 'lfw')
    (tmp_path / 'lfw.bin').write_bytes(b'\x80\x04garbage')
    with pytest.raises(UserError, match='not a valid verification .bin'):
        T.load_verification_set(str(tmp_path), 'lfw')
    with pytest.raises(UserError, match='unknown verification set'):
        T.load_verification_set(str(tmp_path), 'megaface')


def test_load_identity_folders(tmp_path):
    with pytest.raises(UserError, match='not found'):
        T.load_identity_folders(str(tmp_path / 'nope'))
    with pytest.raises(UserError, match='no identity folder'):
        T.load_identity_folders(str(tmp_path))
    for person, value in (('bob', 10), ('alice', 200)):
        (tmp_path / person).mkdir()
        for i in range(2):
            img = np.full((120, 100, 3), value + i, np.uint8)
            cv2.imwrite(str(tmp_path / person / f'{i}.jpg'), img)
    (tmp_path / 'empty').mkdir()
    images, labels, names = T.load_identity_folders(str(tmp_path))
    assert names == ['alice', 'bob']
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    assert images.shape == (4, 112, 112, 3)
    np.testing.assert_allclose(images[0], 200 / 255, atol=2 / 255)
    (tmp_path / 'bob' / '9.jpg').write_bytes(b'broken')
    with pytest.raises(UserError, match=r'9\.jpg: image 4 cannot be decoded'):
        T.load_identity_folders(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Extraction and evaluation paths
def _linear_model(images):
    # Column sums of the left and right halves: flip swaps them; small, exact, numpy only.
    half = images.shape[2] // 2
    return np.stack([images[:, :, :half].sum((1, 2, 3)), images[:, :, half:].sum((1, 2, 3))], 1)


def test_extract_embeddings_flip_and_ccrop():
    rng = np.random.default_rng(0)
    images = rng.random((7, 112, 112, 3)).astype(np.float32)
    plain = E.extract_embeddings(_linear_model, images, batch_size=3, progress=False)
    np.testing.assert_allclose(plain, _linear_model(images), rtol=1e-6)
    flipped = E.extract_embeddings(_linear_model, images, batch_size=3, is_flip=True,
                                   progress=False)
    total = plain.sum(1, keepdims=True)
    np.testing.assert_allclose(flipped, np.concatenate([total, total], 1), rtol=1e-5)
    cropped = E.extract_embeddings(_linear_model, images, batch_size=4, is_ccrop=True,
                                   progress=False)
    # The central crop equals cv2's bilinear resize of the central 98x98 window.
    ref = np.stack([cv2.resize(im[7:105, 7:105], (112, 112), interpolation=cv2.INTER_LINEAR)
                    for im in images])
    np.testing.assert_allclose(E.central_crop(images), ref, atol=1e-4)
    np.testing.assert_allclose(cropped, _linear_model(ref), rtol=1e-4)


def test_extract_embeddings_keras_model_and_bad_output():
    import tensorflow as tf

    inputs = tf.keras.Input((112, 112, 3))
    x = tf.keras.layers.GlobalAveragePooling2D()(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(4, use_bias=False)(x))
    images = np.random.default_rng(1).random((5, 112, 112, 3)).astype(np.float32)
    emb = E.extract_embeddings(model, images, batch_size=2, is_flip=True, progress=False)
    kernel = model.layers[-1].get_weights()[0]
    expected = 2 * images.mean((1, 2)) @ kernel  # pooling is flip invariant
    assert isinstance(emb, np.ndarray) and emb.shape == (5, 4)
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match=r'\(2, d\)'):
        E.extract_embeddings(lambda b: b, images, batch_size=2, progress=False)


def test_evaluate_verification_and_report(tmp_path):
    rng = np.random.default_rng(4)
    n_pairs = 40
    identity = rng.integers(0, 8, n_pairs)
    other = np.where(np.arange(n_pairs) % 2 == 0, identity, (identity + 3) % 8)
    ids = np.stack([identity, other], 1).ravel()
    # The "model" reads an identity code written in pixel (0, 0, 0) and returns an IoM code.
    images = np.zeros((2 * n_pairs, 112, 112, 3), np.float32)
    images[:, 0, 0, 0] = ids / 10.0
    table = rng.integers(0, 4, (8, 16))

    def embed(batch):
        return table[np.rint(batch[:, 0, 0, 0] * 10).astype(int)]

    val = {'lfw': (images, np.arange(n_pairs) % 2 == 0)}
    results = E.evaluate_verification(embed, val, 'Hamming', q=4, batch_size=16, progress=False)
    assert results['lfw']['accuracy'] == 1.0
    assert results['lfw']['distances'].shape == (n_pairs,)
    retrieval = E.evaluate_retrieval(embed, images, ids, 'LUT', q=4, progress=False)
    assert retrieval['map'] == 1.0 and retrieval['cmc'][1] == 1.0

    table_text = E.format_table(results)
    assert 'LFW' in table_text and '| Accuracy' in table_text and '1.0000' in table_text
    assert 'TAR@FAR=1e-04' in table_text
    results['ytf'] = retrieval
    paths = E.write_report(results, str(tmp_path / 'out'), 'run')
    assert paths[0].endswith('run_results.json') and paths[1].endswith('run_lfw.png')
    assert len(paths) == 2
    data = json.loads((tmp_path / 'out' / 'run_results.json').read_text())
    assert data['lfw']['accuracy'] == 1.0 and 'distances' not in data['lfw']
    assert set(data['lfw']['tar_at_far']) == {'1e-03', '1e-04'}
    assert data['ytf']['map'] == 1.0
    png = cv2.imread(paths[1])
    assert png is not None and png.shape[1] > png.shape[0]
    assert not [f for f in os.listdir(tmp_path / 'out') if f.startswith('.')]  # no temp files
