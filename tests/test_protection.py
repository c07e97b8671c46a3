"""Unlinkability (Gomez-Barrero et al. 2018), cross-key scores and revocability on IoM codes."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from modules.protection.measures import (
    cross_key_pair_scores,
    different_subject_pairs,
    evaluate_protection,
    mated_nonmated_scores,
    pair_labels,
    plot_unlinkability,
    revocability_rate,
    same_subject_pairs,
    similarity_scores,
    unlinkability,
)
from modules.utils import UserError

M, Q = 256, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subjects(num_subjects=150, per_subject=4, noise=0.3, seed=0):
    """Synthetic IoM codes: a base code per subject, each sample re-draws a fraction of indices."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, Q, (num_subjects, M))
    labels = np.repeat(np.arange(num_subjects), per_subject)
    redraw = rng.random((labels.size, M)) < noise
    codes = np.where(redraw, rng.integers(0, Q, (labels.size, M)), base[labels])
    return codes, labels


def _under_key(codes, key):
    """A key as the IoM permutation acts on codes: a fixed reordering of the positions."""
    return codes[:, np.random.default_rng(key).permutation(codes.shape[1])]


def test_unlinkability_identical_distributions_is_zero():
    scores = np.random.default_rng(0).normal(size=5000)
    s, d_local, d_sys = unlinkability(scores, scores.copy(), bins=50)
    assert d_sys == 0.0
    assert np.all(d_local == 0.0)
    assert s.shape == d_local.shape == (50,)


def test_unlinkability_disjoint_distributions_is_one():
    rng = np.random.default_rng(1)
    _, d_local, d_sys = unlinkability(rng.uniform(0.6, 1.0, 800), rng.uniform(0.0, 0.4, 3000))
    assert d_sys == pytest.approx(1.0)
    assert d_local.max() == 1.0


def test_unlinkability_hand_computed():
    mated, nonmated = [0, 0, 1, 1], [1, 1, 2, 2]
    edges = [-0.5, 0.5, 1.5, 2.5]
    # p_m = (.5, .5, 0), p_nm = (0, .5, .5): D = (1, 0, 0) and D_sys = .5 * 1.
    s, d_local, d_sys = unlinkability(mated, nonmated, bins=edges)
    np.testing.assert_allclose(s, [0, 1, 2])
    np.testing.assert_allclose(d_local, [1, 0, 0])
    assert d_sys == pytest.approx(0.5)
    # With omega = 2 the middle bin has LR*omega = 2: D = 2 * 2 / 3 - 1 = 1/3.
    _, d_local, d_sys = unlinkability(mated, nonmated, bins=edges, omega=2.0)
    np.testing.assert_allclose(d_local, [1, 1 / 3, 0])
    assert d_sys == pytest.approx(0.5 + 0.5 / 3)


def test_unlinkability_matches_lr_formula():
    rng = np.random.default_rng(2)
    mated, nonmated = rng.normal(0.5, 1, 4000), rng.normal(0, 1, 4000)
    s, d_local, d_sys = unlinkability(mated, nonmated, bins=30)
    edges = np.linspace(min(mated.min(), nonmated.min()), max(mated.max(), nonmated.max()), 31)
    p_m = np.histogram(mated, edges, density=True)[0]
    p_nm = np.histogram(nonmated, edges, density=True)[0]
    with np.errstate(divide='ignore', invalid='ignore'):
        lr = p_m / p_nm
        expected = np.where(lr > 1, 2 * lr / (1 + lr) - 1, 0.0)
    expected[(p_nm == 0) & (p_m > 0)] = 1.0
    np.testing.assert_allclose(d_local, expected, atol=1e-12)
    assert d_sys == pytest.approx(np.sum(p_m * np.diff(edges) * expected))
    assert 0.0 < d_sys < 1.0


def test_unlinkability_discrete_scores_get_one_bin_per_value():
    mated = np.array([3, 3, 4, 5]) / 8
    nonmated = np.array([0, 1, 1, 3]) / 8
    s, d_local, _ = unlinkability(mated, nonmated, bins=100)
    np.testing.assert_allclose(s, np.array([0, 1, 3, 4, 5]) / 8)
    np.testing.assert_allclose(d_local, [0, 0, 1 / 3, 1, 1])


def test_unlinkability_bad_input():
    with pytest.raises(UserError, match='no scores'):
        unlinkability([], [1.0])
    with pytest.raises(UserError, match='NaN'):
        unlinkability([np.nan], [1.0])
    with pytest.raises(UserError, match='bins'):
        unlinkability([1.0], [1.0], bins=0)
    with pytest.raises(UserError, match='increasing'):
        unlinkability([1.0], [1.0], bins=[1.0, 0.0])
    with pytest.raises(UserError, match='omega'):
        unlinkability([1.0], [1.0], omega=0.0)


def test_same_key_is_linkable_and_independent_keys_are_not():
    codes, labels = _subjects()
    # Same key: mated templates keep ~ (0.7 + 0.3/8) of their indices, non-mated ~ 1/q.
    mated, nonmated = mated_nonmated_scores(codes, codes, labels)
    assert mated.mean() > 0.5
    assert nonmated.mean() == pytest.approx(1 / Q, abs=0.01)
    assert unlinkability(mated, nonmated)[2] > 0.95
    # Independent keys: both distributions are those of unrelated codes.
    mated, nonmated = mated_nonmated_scores(_under_key(codes, 1), _under_key(codes, 2), labels)
    assert mated.mean() == pytest.approx(1 / Q, abs=0.01)
    assert nonmated.mean() == pytest.approx(1 / Q, abs=0.01)
    assert unlinkability(mated, nonmated)[2] < 0.1


def test_similarity_scores():
    a = np.array([[0, 1, 2, 3], [1, 1, 1, 1]])
    b = np.array([[0, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(similarity_scores(a, b), [0.5, 1.0])
    with pytest.raises(UserError, match='shape'):
        similarity_scores(a, b[:1])
    with pytest.raises(UserError, match='integer'):
        similarity_scores(a.astype(float), b)


def test_pair_generators():
    labels = np.array([3, 1, 3, 2, 1, 3])
    i, j = same_subject_pairs(labels)
    assert sorted(zip(i.tolist(), j.tolist())) == [
        (0, 2), (0, 5), (1, 4), (2, 0), (2, 5), (4, 1), (5, 0), (5, 2)]
    i, j = same_subject_pairs(labels, same_sample=True)
    assert i.size == 8 + 6
    i, j = different_subject_pairs(labels)
    assert i.size == 36 - 14 and np.all(labels[i] != labels[j])
    # Large, unbalanced label sets use sampling: still only different-subject pairs, seeded.
    big = np.r_[np.zeros(3000, np.int64), np.arange(1, 21)]
    i, j = different_subject_pairs(big, max_pairs=5000, seed=4)
    assert i.size == 5000 and np.all(big[i] != big[j])
    i2, j2 = different_subject_pairs(big, max_pairs=5000, seed=4)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_array_equal(j, j2)


def test_mated_nonmated_bounds_and_errors():
    codes, labels = _subjects(num_subjects=60, per_subject=5)
    mated, nonmated = mated_nonmated_scores(codes, codes, labels, max_pairs=500, seed=1)
    assert mated.size == 500 and nonmated.size == 500
    again = mated_nonmated_scores(codes, codes, labels, max_pairs=500, seed=1)
    np.testing.assert_array_equal(again[0], mated)
    with pytest.raises(UserError, match='labels'):
        mated_nonmated_scores(codes, codes, labels[:-1])
    with pytest.raises(UserError, match='no mated pairs'):
        mated_nonmated_scores(codes[:10], codes[:10], np.arange(10))
    with pytest.raises(UserError, match='no non-mated pairs'):
        mated_nonmated_scores(codes[:10], codes[:10], np.zeros(10))


def test_revocability_rate():
    codes, labels = _subjects(num_subjects=50)
    # Same key: the old template still passes a loose threshold; a new key revokes it.
    assert revocability_rate(codes, codes, labels, threshold=0.6 * M) == 1.0
    assert revocability_rate(_under_key(codes, 1), _under_key(codes, 2), labels,
                             threshold=0.6 * M) == 0.0
    # Direction: accepted when the Hamming distance is strictly below the threshold.
    a = np.zeros((2, 4), np.int64)
    b = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    lab = np.array([0, 1])
    assert revocability_rate(a, b, lab, threshold=2) == 0.0
    assert revocability_rate(a, b, lab, threshold=2.5) == 0.5
    assert revocability_rate(a, b, lab, threshold=4) == 1.0
    with pytest.raises(UserError, match='no same-subject'):
        revocability_rate(a, b, lab, threshold=2, same_sample=False)


def test_plot_unlinkability(tmp_path):
    codes, labels = _subjects(num_subjects=40)
    mated, nonmated = mated_nonmated_scores(codes, codes, labels)
    s, d_local, d_sys = unlinkability(mated, nonmated)
    path = tmp_path / 'sub' / 'unlinkability.png'
    plot_unlinkability(mated, nonmated, s, d_local, d_sys, str(path))
    with open(path, 'rb') as fh:
        assert fh.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.listdir(tmp_path / 'sub') == ['unlinkability.png']


def _verification_set(num_pairs=300, seed=0):
    """Codes laid out as a verification set: pair i = rows 2i, 2i+1; half the pairs genuine."""
    codes, labels = _subjects(num_subjects=num_pairs, per_subject=2, seed=seed)
    rng = np.random.default_rng(seed + 1)
    issame = rng.random(num_pairs) < 0.5
    # An impostor pair: replace its second image by another subject's first sample.
    other = (np.arange(num_pairs) + 1) % num_pairs
    second = np.where(issame, 2 * np.arange(num_pairs) + 1, 2 * other)
    rows = np.stack([2 * np.arange(num_pairs), second], axis=1).ravel()
    return codes[rows], issame


def test_pair_labels_and_cross_key_scores():
    np.testing.assert_array_equal(pair_labels([True, False, True]), [0, 0, 5, 6, 2, 2])
    codes, issame = _verification_set(num_pairs=200)
    mated, nonmated = cross_key_pair_scores(codes, codes, issame)
    assert mated.size == 2 * issame.sum() and nonmated.size == 2 * (~issame).sum()
    assert mated.min() > 0.4 and nonmated.mean() == pytest.approx(1 / Q, abs=0.01)
    mated, _ = cross_key_pair_scores(codes, codes, issame, same_sample=True)
    assert mated.size == codes.shape[0] and np.all(mated == 1.0)
    with pytest.raises(UserError, match='pairs need'):
        cross_key_pair_scores(codes, codes, issame[:-1])


def test_evaluate_protection_synthetic():
    codes, issame = _verification_set()
    keyed = [_under_key(codes, key) for key in (11, 12, 13)]
    report = evaluate_protection(keyed, codes, issame)
    # A key permutes positions: same-key verification is unchanged, cross-key codes unrelated.
    assert report['eer_shared_key'] == pytest.approx(report['eer_plain'])
    assert report['eer_plain'] < 0.05
    assert report['tar_same_key'] > 0.9
    assert report['d_sys'] < 0.15 and report['d_sys_same_sample'] < 0.15
    assert report['revocability_rate'] == 0.0 and report['revocability_rate_same_sample'] == 0.0
    assert report['num_mated'] == 6 * 2 * issame.sum()
    # The same key twice is fully linkable and not revoked at all.
    same = evaluate_protection([keyed[0], keyed[0]], codes, issame)
    assert same['d_sys'] > 0.9 and same['d_sys_same_sample'] == pytest.approx(1.0)
    assert same['revocability_rate_same_sample'] == 1.0
    assert same['revocability_rate'] == pytest.approx(same['tar_same_key'])
    with pytest.raises(UserError, match='at least two keys'):
        evaluate_protection(keyed[:1], codes, issame)


def _run_cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES='-1', TF_CPP_MIN_LOG_LEVEL='2')
    return subprocess.run([sys.executable, os.path.join(ROOT, 'eval_protection.py')] + args,
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_eval_protection_cli(tmp_path):
    import cv2
    import yaml

    rng = np.random.default_rng(0)
    encoded = [cv2.imencode('.jpg', (rng.random((112, 112, 3)) * 255).astype(np.uint8))[1]
               .tobytes() for _ in range(24)]
    (tmp_path / 'val').mkdir()
    (tmp_path / 'val' / 'lfw.bin').write_bytes(
        pickle.dumps((encoded, [bool(i % 2) for i in range(12)]), protocol=4))
    cfg = dict(batch_size=8, eval_batch_size=8, sub_name='prot', backbone_type='MobileNetV2',
               use_pretrain=False, head_type='IoMHead', train_dataset='unused', num_classes=2,
               num_samples=8, epochs=1, base_lr=0.001, test_dataset='val', q=4, m=16,
               loss_fun='batch_hard_triplet', perm_key=3)
    (tmp_path / 'cfg.yaml').write_text(yaml.safe_dump(cfg))

    bad = _run_cli(['--cfg_path', 'cfg.yaml', '--num_keys', '1'], tmp_path)
    assert bad.returncode == 2 and 'num_keys' in bad.stderr

    bad = _run_cli(['--cfg_path', 'cfg.yaml', '--attacks', '--far', '2'], tmp_path)
    assert bad.returncode == 2 and '--far: 2 must lie in (0, 1)' in bad.stderr

    done = _run_cli(['--cfg_path', 'cfg.yaml', '--num_keys', '3', '--attacks', '--victims', '4',
                     '--attack_keys', '2', '--far', '0.5'], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'Stolen-key attacks: 4 victims' in done.stdout and 'seconds per victim' in done.stdout
    with open(tmp_path / 'logs' / 'prot' / 'protection_attacks.json') as fh:
        attacks = json.load(fh)
    # (This untrained model's embeddings are ~1e-12: exact inversion is tested in test_attacks.)
    assert attacks['victims'] == 4 and set(attacks) >= {'lp', 'gradient', 'baselines', 'linkage'}
    assert set(attacks['at_far']) == {'far=0.5'} and 'baselines' in attacks['at_far']['far=0.5']
    assert os.path.getsize(tmp_path / 'logs' / 'prot' / 'protection_attacks.png') > 1000
    assert 'D_sys (mated: genuine pairs)' in done.stdout
    with open(tmp_path / 'logs' / 'prot' / 'protection_lfw.json') as fh:
        report = json.load(fh)
    assert report['num_keys'] == 3 and len(report['keys']) == 3 and report['num_pairs'] == 12
    assert 0.0 <= report['d_sys'] <= 1.0 and 0.0 <= report['revocability_rate'] <= 1.0
    assert report['num_mated'] == 3 * 2 * 2 * 6 and report['threshold'] > 0
    assert os.path.getsize(tmp_path / 'logs' / 'prot' / 'unlinkability_lfw.png') > 1000
    assert isinstance(report['key_change_ok'], bool) and 0 <= report['zero_effort_rate'] <= 1
