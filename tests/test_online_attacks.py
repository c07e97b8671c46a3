"""Online attacks of a client token (modules/protection/online.py, testbed.py): the proposals,
and the whole evaluation against serve.py on 127.0.0.1 with a tiny seeded model: with scores
exposed and no limits the hill-climb lowers the distance (it is not a no-op); with the defaults
no answer holds a distance and at most --max_failures verify attempts per subject and lockout
window are answered."""
import math

import numpy as np
import pytest

from modules.protection.online import (
    ATTACKS,
    format_online_table,
    propose,
    psnr,
    smooth_noise,
)

BUDGET = 96  # 6 rounds of 16 proposals per attack and subject
SUBJECTS = 2
THRESHOLD = 2  # tiny model: other photos differ in 5-16 of 32 indices; the climb starts there


def test_proposals_are_smooth_noise_around_the_current_image():
    rng = np.random.default_rng(0)
    noise = smooth_noise(rng, 64, 112, sigma=8.0)
    assert noise.shape == (64, 112, 112, 3)
    # Drawn on a 14x14 grid: neighbouring pixels move together, pixels a grid cell or more
    # apart much less.
    flat = noise[..., 0]
    near = np.corrcoef(flat[:, :, :-1].ravel(), flat[:, :, 1:].ravel())[0, 1]
    far = np.corrcoef(flat[:, :, :-16].ravel(), flat[:, :, 16:].ravel())[0, 1]
    assert near > 0.95 and abs(far) < 0.3, (near, far)
    current = np.full((112, 112, 3), 250, np.uint8)
    images = propose(current, rng, 16)
    assert images.dtype == np.uint8 and images.shape == (16, 112, 112, 3)
    assert images.max() == 255 and len({im.tobytes() for im in images}) == 16  # clipped, distinct
    assert psnr(current, current) == math.inf
    assert psnr(images[0], current) == pytest.approx(
        10 * np.log10(255 ** 2 / np.mean((images[0].astype(float) - 250) ** 2)))


@pytest.fixture(scope='module')
def report(tmp_path_factory):
    from modules.protection.testbed import evaluate_online
    from tests.helpers.tiny_iom import make_tiny_model, synthetic_faces
    work = tmp_path_factory.mktemp('online')
    cfg_path = make_tiny_model(str(work))
    faces, gids = synthetic_faces(SUBJECTS + 4, 2)  # pairs: images 2i and 2i+1, one person each
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # the tiny config's checkpoints/ are found from there
        return evaluate_online(cfg_path, faces / 255.0, gids[0::2] == gids[1::2], SUBJECTS,
                               BUDGET, seed=0, threshold=THRESHOLD)


def rows(report, setting):
    return {r['attack']: r for r in report['rows'] if r['setting'] == setting}


def test_with_scores_exposed_and_no_limits_the_hill_climb_lowers_the_distance(report):
    print(format_online_table(report))
    exposed = rows(report, 'scores exposed, no limits')
    assert set(exposed) == set(ATTACKS) and report['threshold'] == THRESHOLD
    assert all(r['answered'] == r['sent'] for r in exposed.values())  # nothing refused
    assert exposed['hill_climb']['scored'] == exposed['hill_climb']['answered']
    climbs = report['per_subject']['hill_climb / scores exposed, no limits']
    starts = report['start_distances']
    assert all(start > THRESHOLD for start in starts)
    # 96 proposals on 32-index codes: one subject may stall on a plateau of equal distances
    # (seen under load in a fresh-clone run); a climb that moves no subject is a no-op.
    assert any(run['impersonated'] or run['best_distance'] < start
               for start, run in zip(starts, climbs)), (starts, climbs)


def test_with_the_defaults_no_distance_and_a_few_answers_per_lockout_window(report):
    defaults = rows(report, 'defaults')
    limits = report['limits_defaults']
    assert limits['max_failures'] == 5 and limits['rate'] > 0
    assert all(r['scored'] == 0 and r['impersonated'] == 0 for r in defaults.values())
    for kind in ('hill_climb', 'decision_only'):
        for run in report['per_subject'][f'{kind} / defaults']:
            windows = math.floor(run['seconds'] / limits['lockout_s'])  # lockouts that ended
            assert run['answered'] <= limits['max_failures'] + windows, run
            assert run['sent'] == BUDGET
    identify = report['per_subject']['identify / defaults']
    assert sum(r['answered'] for r in identify) <= limits['max_identify_failures'] + math.floor(
        sum(r['seconds'] for r in identify) / limits['lockout_s'])
