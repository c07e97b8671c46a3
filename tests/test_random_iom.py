"""The random-IoM baseline (Jin et al.: Gaussian random projections): seeded, stable, keyed."""
import numpy as np

from modules.layers import key_permutation
from modules.models import RANDOM_IOM_SEED, random_iom_codes


def reference_codes(x, m, q, perm_key, seed):
    """Plain loops over items and groups, from the same Gaussian draw."""
    w = np.random.default_rng(seed).standard_normal((x.shape[1], m * q)).astype(np.float32)
    y = x[:, key_permutation(perm_key, x.shape[1])]
    return np.array([[int(np.argmax(y[n] @ w[:, g * q:(g + 1) * q])) for g in range(m)]
                     for n in range(len(x))])


def test_codes_are_the_index_of_max_of_seeded_gaussian_projections():
    x = np.random.default_rng(1).standard_normal((9, 16)).astype(np.float32)
    codes = random_iom_codes(x, m=6, q=4, perm_key=11, seed=5, batch_size=4)
    np.testing.assert_array_equal(codes, reference_codes(x, 6, 4, 11, 5))
    assert codes.shape == (9, 6) and codes.min() >= 0 and codes.max() < 4


def test_seed_and_key_decide_the_codes():
    x = np.random.default_rng(2).standard_normal((50, 32)).astype(np.float32)
    base = random_iom_codes(x, 64, 8, perm_key=None, seed=0)
    np.testing.assert_array_equal(base, random_iom_codes(x, 64, 8, perm_key=None, seed=0))
    assert (base != random_iom_codes(x, 64, 8, perm_key=None, seed=1)).mean() > 0.5
    keyed = random_iom_codes(x, 64, 8, perm_key=7, seed=0)
    assert (base != keyed).mean() > 0.5
    # The key acts on the embedding exactly as the model's permutation layer does.
    np.testing.assert_array_equal(keyed, random_iom_codes(x[:, key_permutation(7, 32)], 64, 8,
                                                          perm_key=None, seed=0))


def test_stable_across_runs_and_versions():
    # Seed 0 must give these codes on every machine and numpy version, or results written with
    # --seed 0 could not be compared: a change of the generator's stream shows up here.
    x = np.linspace(-1, 1, 3 * 8, dtype=np.float32).reshape(3, 8)
    np.testing.assert_array_equal(random_iom_codes(x, m=4, q=4, seed=0),
                                  [[3, 0, 3, 0], [0, 0, 0, 3], [0, 3, 1, 3]])


def test_same_random_iom_as_the_stage2_monitor():
    """The tester's default random IoM is the projection stage 2's key-change monitor draws."""
    from modules.training import monitor
    assert RANDOM_IOM_SEED == monitor.RANDOM_IOM_SEED
    x = np.random.default_rng(3).standard_normal((20, 24)).astype(np.float32)
    kernel = np.random.default_rng(monitor.RANDOM_IOM_SEED).standard_normal((24, 16 * 8))
    np.testing.assert_array_equal(random_iom_codes(x, 16, 8),
                                  monitor.projection_codes(x, kernel.astype(np.float32), None,
                                                           16, 8))

