"""Evaluating the sets a user has: --sets, the default of every set present, results kept per
test folder and set, and test_twostage_iom.py's float / learned / random table."""
import json
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest

from modules.evaluations import evaluate_pairs, results_dir, write_reports
from modules.testsets import select_sets
from modules.utils import UserError
from tests.helpers.tiny_iom import make_tiny_model, synthetic_faces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_bin(path, faces, labels):
    """An InsightFace .bin of consecutive face pairs (images 2i, 2i+1)."""
    blobs = [cv2.imencode('.jpg', face[:, :, ::-1])[1].tobytes() for face in faces]
    issame = [bool(labels[i] == labels[i + 1]) for i in range(0, len(labels), 2)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as fh:
        pickle.dump((blobs, issame), fh, protocol=4)


def run(script, *args, cwd):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A tiny model, folder A (lfw.bin, cfp_fp.bin: the config's test_dataset) and folder B
    (lfw.bin only)."""
    work = tmp_path_factory.mktemp('sets')
    faces, ids = synthetic_faces(10, 4)
    # Pairs (0,1) same, (2,3) other ids: alternate same / different over 20 pairs.
    order = [i for k in range(10) for i in ((4 * k, 4 * k + 1) if k % 2 == 0
                                              else (4 * k, (4 * k + 6) % 40))]
    for folder, names in (('A', ('lfw', 'cfp_fp')), ('B', ('lfw',))):
        for name in names:
            write_bin(str(work / folder / f'{name}.bin'), faces[order + order], ids[order + order])
    make_tiny_model(str(work), test_dataset='A')
    return work


def test_default_is_every_set_present_with_one_line(work, capsys):
    assert select_sets(str(work / 'A')) == ['lfw', 'cfp_fp']
    assert capsys.readouterr().out == (f"[*] evaluating lfw, cfp_fp; not under {work / 'A'}: "
                                       'agedb_30, cfp_ff\n')


def test_results_per_set_and_folder_summary_only_for_the_config_folder(tmp_path):
    rng = np.random.default_rng(0)
    issame = np.arange(40) % 2 == 0
    results = {name: evaluate_pairs(rng.normal(size=(80, 8)) + issame.repeat(2)[:, None], issame,
                                    'cosine') for name in ('lfw', 'cfp_fp')}
    out, a, b = str(tmp_path / 'logs'), str(tmp_path / 'A'), str(tmp_path / 'B')
    write_reports(results, out, 'arcface', a, default_dataset=a)
    summary = json.loads((tmp_path / 'logs' / 'arcface_results.json').read_text())
    assert sorted(summary) == ['cfp_fp', 'lfw']
    record = json.loads(open(os.path.join(results_dir(out, a), 'arcface_cfp_fp.json')).read())
    assert record['set'] == 'cfp_fp' and record['test_dataset'] == os.path.realpath(a)
    assert record['accuracy'] == summary['cfp_fp']['accuracy']
    # Another folder's run writes its own files and leaves A's and the summary alone.
    other = {'lfw': evaluate_pairs(rng.normal(size=(80, 8)), issame, 'cosine')}
    paths = write_reports(other, out, 'arcface', b, default_dataset=a)
    assert all(p.startswith(results_dir(out, b)) for p in paths) and len(paths) == 2
    assert json.loads((tmp_path / 'logs' / 'arcface_results.json').read_text()) == summary
    assert json.loads(open(os.path.join(results_dir(out, a), 'arcface_lfw.json')).read())[
        'accuracy'] == summary['lfw']['accuracy']


def test_other_folder_with_random_baseline_leaves_the_summary_alone(work):
    out = run('test_twostage_iom.py', '--cfg_path', 'tiny.yaml', '--test_dataset', 'B',
              '--sets', 'lfw', '--baseline', 'random', '--seed', '3', cwd=work)
    rows = [line for line in out.splitlines() if line.startswith('| lfw |')]
    assert [row.split(' | ')[1] for row in rows] == [
        'ArcFace float (cosine)', 'IoM m=32 q=8 (Hamming), learned',
        'IoM m=32 q=8 (Hamming), random (seed 3)']
    folder = work / results_dir('logs/tiny_s2', str(work / 'B'))
    record = json.loads((folder / 'iom_Hamming_comparison.json').read_text())
    assert list(record['sets']) == ['lfw'] and list(record['sets']['lfw']) == [
        'float', 'learned', 'random']
    assert (record['m'], record['q'], record['random_seed']) == (32, 8, 3)
    learned = json.loads((folder / 'iom_Hamming_lfw.json').read_text())
    assert record['sets']['lfw']['learned']['eer'] == learned['eer']
    # B is not the config's test folder: the summary the gallery reads is not written.
    assert not (work / 'logs' / 'tiny_s2' / 'iom_Hamming_results.json').exists()
    assert not (work / 'logs' / 'tiny_s2' / 'iom_Hamming_comparison.json').exists()


def test_results_folders_differ_per_test_folder(tmp_path):
    first, second = tmp_path / 'x' / 'test', tmp_path / 'y' / 'test'
    assert results_dir('logs/r', str(first)) != results_dir('logs/r', str(second))
    assert results_dir('logs/r', str(first)).startswith(os.path.join('logs', 'r', 'results',
                                                                     'test-'))
    assert results_dir('logs/r', str(first)) == results_dir('logs/r', str(first) + '/')


def test_set_selection_errors_before_decoding(work, tmp_path):
    with pytest.raises(UserError, match=r"verification set 'agedb_30' not found under .*B.*"
                       r'agedb_30\.bin; present: lfw'):
        select_sets(str(work / 'B'), ['lfw', 'agedb_30'])
    with pytest.raises(UserError, match=r'no verification set under .*lfw\.bin, agedb_30\.bin'):
        select_sets(str(tmp_path))
    with pytest.raises(UserError, match=r"unknown verification set 'calfw' .* and no .*calfw\.bin"):
        select_sets(str(work / 'B'), ['calfw'])
    assert select_sets(str(work / 'A'), ['cfp_fp']) == ['cfp_fp']
