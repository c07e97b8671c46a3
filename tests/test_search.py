"""1:N search over IoM codes: exactness against a brute-force reference, ties, bad input."""
import numpy as np
import pytest

from modules.deploy.search import pack_codes, search, search_reference
from modules.utils import UserError


def _brute_force(gallery, probes, k):
    """Independent reference: full score matrix, stable lexsort on (-score, index)."""
    scores = (np.asarray(probes)[:, None, :] == np.asarray(gallery)[None, :, :]).sum(axis=2)
    index = np.arange(scores.shape[1])
    order = np.stack([np.lexsort((index, -row)) for row in scores])[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def _check(gallery, probes, k, chunk_size):
    idx, sc = search(gallery, probes, k, chunk_size=chunk_size)
    ref_idx, ref_sc = _brute_force(gallery, probes, k)
    assert idx.shape == sc.shape == (len(probes), k)
    np.testing.assert_array_equal(sc, ref_sc)
    np.testing.assert_array_equal(idx, ref_idx)


@pytest.mark.parametrize('n, m, q, k, chunk_size', [
    (37, 3, 2, 5, 5),        # heavy ties, several chunks, last chunk partial
    (37, 3, 2, 12, 5),       # k larger than a chunk
    (37, 4, 3, 37, 8),       # k = N
    (50, 5, 2, 1, 50),       # one chunk
    (64, 70, 4, 9, 7),       # m not a multiple of 64 (padded words)
    (40, 130, 256, 6, 11),   # all 8 bit planes
    (25, 1, 3, 25, 4),       # m = 1: almost everything ties
])
def test_search_matches_brute_force(n, m, q, k, chunk_size):
    rng = np.random.default_rng(n * 1000 + m)
    gallery = rng.integers(0, q, (n, m))
    probes = rng.integers(0, q, (9, m))
    probes[0] = gallery[n // 2]  # an exact match must rank first with score m (unless tied)
    _check(gallery, probes, k, chunk_size)


def test_search_random_sweep():
    rng = np.random.default_rng(7)
    for _ in range(60):
        n = int(rng.integers(1, 120))
        m = int(rng.integers(1, 100))
        q = int(rng.integers(1, 9))
        gallery = rng.integers(0, q, (n, m)).astype(np.uint8)
        probes = rng.integers(0, q, (int(rng.integers(1, 20)), m)).astype(np.uint8)
        _check(gallery, probes, int(rng.integers(1, n + 1)), int(rng.integers(1, 2 * n + 2)))


@pytest.mark.parametrize('num_probes, m', [(1, 64), (2, 8), (2, 2040), (1, 70), (3, 64)])
def test_search_few_probes(num_probes, m):
    # One or two probes with m % 8 == 0 take the byte-wise path; the others the bit planes.
    rng = np.random.default_rng(num_probes * 100 + m)
    gallery = rng.integers(0, 3, (45, m))
    probes = rng.integers(0, 3, (num_probes, m))
    probes[-1] = gallery[44]
    for k, chunk_size in ((1, 7), (10, 4), (45, 16)):
        _check(gallery, probes, k, chunk_size)


def test_search_independent_of_chunk_size_and_dtype():
    rng = np.random.default_rng(3)
    gallery = rng.integers(0, 8, (300, 512))
    probes = rng.integers(0, 8, (20, 512))
    probes[:5] = gallery[[0, 299, 150, 7, 7]]
    first = search(gallery, probes, 10, chunk_size=4096)
    for chunk in (1, 13, 64, 299):
        got = search(gallery.astype(np.uint8), probes.astype(np.int32), 10, chunk_size=chunk)
        np.testing.assert_array_equal(got[0], first[0])
        np.testing.assert_array_equal(got[1], first[1])
    np.testing.assert_array_equal(first[0][:5, 0], [0, 299, 150, 7, 7])
    np.testing.assert_array_equal(first[1][:5, 0], 512)
    assert np.all(np.diff(first[1], axis=1) <= 0)  # best first


def test_search_reference_agrees():
    rng = np.random.default_rng(11)
    gallery = rng.integers(0, 2, (30, 4))
    probes = rng.integers(0, 2, (6, 4))
    ref = search_reference(gallery, probes, 30)
    mine = _brute_force(gallery, probes, 30)
    np.testing.assert_array_equal(ref[0], mine[0])
    np.testing.assert_array_equal(ref[1], mine[1])


def test_search_no_probes():
    idx, sc = search(np.zeros((5, 8), np.uint8), np.zeros((0, 8), np.uint8), 3)
    assert idx.shape == sc.shape == (0, 3)


def test_pack_codes():
    packed = pack_codes(np.array([[0, 7], [3, 1]], np.int64), q=8)
    assert packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, [[0, 7], [3, 1]])
    assert pack_codes(np.full((1, 3), 255)).dtype == np.uint8
    with pytest.raises(UserError, match='q must be <= 256'):
        pack_codes(np.zeros((2, 3), np.int64), q=300)
    with pytest.raises(UserError, match=r'\[0, 8\)'):
        pack_codes(np.array([[0, 8]]), q=8)
    with pytest.raises(UserError, match='integers'):
        pack_codes(np.zeros((2, 3), np.float32))
    with pytest.raises(UserError, match='2-D'):
        pack_codes(np.zeros(4, np.int64))
    with pytest.raises(UserError, match=r'\[0, 256\)'):
        pack_codes(np.array([[-1, 2]]))


@pytest.mark.parametrize('gallery, probes, k, match', [
    (np.zeros((5, 8), np.uint8), np.zeros((2, 7), np.uint8), 1, 'm = 7 but gallery'),
    (np.full((5, 8), 300), np.zeros((2, 8), np.uint8), 1, r'q <= 256'),
    (np.zeros((5, 8), np.uint8), np.full((2, 8), 256), 1, 'probe_codes'),
    (np.zeros((5, 8), np.uint8), np.zeros((2, 8), np.uint8), 6, 'k = 6'),
    (np.zeros((5, 8), np.uint8), np.zeros((2, 8), np.uint8), 0, 'k = 0'),
    (np.zeros((5, 8), np.uint8), np.zeros((2, 8), np.uint8), 2.5, 'integer'),
    (np.zeros((5, 8), np.float64), np.zeros((2, 8), np.uint8), 1, 'integers'),
])
def test_search_bad_input(gallery, probes, k, match):
    with pytest.raises(UserError, match=match):
        search(gallery, probes, k)


def test_search_bad_chunk_size():
    with pytest.raises(UserError, match='chunk_size'):
        search(np.zeros((5, 8), np.uint8), np.zeros((2, 8), np.uint8), 1, chunk_size=0)
