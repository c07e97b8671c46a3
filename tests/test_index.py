"""The in-memory code index: exactly `search_reference` after appends, removals (tombstones,
compaction, a reused largest id) and with several threads; layout and bad input."""
import numpy as np
import pytest

from modules.deploy.index import CodeIndex
from modules.deploy.search import search_reference
from modules.utils import UserError


def _check(index, held, rng, q):
    """Compare the index with the reference on the codes `held` ({id: code}) in id order."""
    ids = np.array(sorted(held), np.int64)
    np.testing.assert_array_equal(index.ids(), ids)
    assert len(index) == len(ids)
    if not len(ids):
        return
    gallery = np.stack([held[i] for i in ids])
    probes = rng.integers(0, q, (int(rng.integers(1, 5)), gallery.shape[1]))
    probes[0] = gallery[rng.integers(len(gallery))]  # an exact match
    k = int(rng.integers(1, len(ids) + 1))
    got_ids, got_scores = index.search(probes, k)
    ref_index, ref_scores = search_reference(gallery, probes, k)
    np.testing.assert_array_equal(got_scores, ref_scores)
    np.testing.assert_array_equal(got_ids, ids[ref_index])


@pytest.mark.parametrize('threads', [1, 2, 3])
def test_index_equals_reference_through_appends_and_removals(threads):
    rng = np.random.default_rng(threads)
    for _ in range(25):
        m, q = int(rng.integers(1, 140)), int(rng.integers(1, 12))
        # Tiny blocks and chunks: many blocks, spans and threads on a few dozen codes.
        index = CodeIndex(m, q, block_size=int(rng.integers(1, 24)),
                          chunk_size=int(rng.integers(1, 9)), threads=threads)
        held, next_id = {}, 1
        for _ in range(6):
            n = int(rng.integers(0, 25))
            ids = next_id + np.cumsum(rng.integers(1, 3, n))
            codes = rng.integers(0, q, (n, m)).astype(np.uint8)
            index.append(ids, codes)
            held.update(zip(ids.tolist(), codes))
            next_id = int(ids[-1]) + 1 if n else next_id
            if held and rng.random() < 0.7:
                gone = rng.choice(sorted(held), int(rng.integers(0, len(held) + 1)), replace=False)
                # Ids never held and repeated ids are ignored.
                asked = np.concatenate([gone, gone[:2], [next_id + 100]]).astype(np.int64)
                assert index.remove(asked) == len(gone)
                for i in gone:
                    del held[int(i)]
                if held and rng.random() < 0.5:
                    next_id = max(held) + 1  # SQLite reuses the largest rowid once it is deleted
            _check(index, held, rng, q)


def test_compaction_drops_tombstones_and_keeps_order():
    rng = np.random.default_rng(5)
    index = CodeIndex(64, 8, block_size=16, chunk_size=4, threads=2)
    codes = rng.integers(0, 8, (100, 64)).astype(np.uint8)
    index.append(np.arange(100) * 3, codes)
    held = dict(zip((np.arange(100) * 3).tolist(), codes))
    assert index.remove(np.arange(0, 30) * 3) == 30  # past the fraction: compacted
    for i in range(30):
        del held[3 * i]
    assert index._size == 70 and index._dead == 0 and len(index._blocks) == 5
    index.append([400, 401], codes[:2])
    held.update({400: codes[0], 401: codes[1]})
    _check(index, held, rng, 8)


def test_layout_and_memory():
    index = CodeIndex(256, 8, block_size=1024)
    assert index.num_planes == 3 and index.bytes_per_code == 96
    assert CodeIndex(512, 8).bytes_per_code == 192 and CodeIndex(512, 2).bytes_per_code == 64
    codes = np.random.default_rng(0).integers(0, 8, (5000, 256), dtype=np.uint8)
    index.append(np.arange(5000), codes)
    planes = 5000 * 96
    # Blocks of 1024 codes (the last one partly used), ids and liveness flags beside them.
    assert planes < index.allocated_bytes() <= 1.3 * planes


@pytest.mark.parametrize('call, match', [
    (lambda ix: ix.append([1], np.zeros((1, 8), np.uint8)), r'length m = 8'),
    (lambda ix: ix.append([1], np.full((1, 16), 8, np.uint8)), r'\[0, 8\)'),
    (lambda ix: ix.append([1], np.full((1, 16), 9, np.int64)), r'\[0, 8\)'),
    (lambda ix: ix.append([1], np.zeros((1, 16), np.float32)), 'integers'),
    (lambda ix: ix.append([1, 2], np.zeros((1, 16), np.uint8)), 'one integer id per code'),
    (lambda ix: ix.append([2, 2], np.zeros((2, 16), np.uint8)), 'must increase'),
    (lambda ix: ix.append([5], np.zeros((1, 16), np.uint8)), 'not above the ids already held'),
    (lambda ix: ix.remove(np.array([1.5])), 'integer ids'),
    (lambda ix: ix.search(np.zeros((1, 16), np.uint8), 0), 'k = 0'),
    (lambda ix: ix.search(np.zeros((1, 16), np.uint8), 3), 'k = 3'),
    (lambda ix: ix.search(np.zeros((1, 16), np.uint8), 1.0), 'k must be an integer'),
    (lambda ix: ix.search(np.zeros((1, 15), np.uint8), 1), 'length m = 15'),
    (lambda ix: ix.search(np.full((1, 16), 8), 1), r'\[0, 8\)'),
])
def test_bad_input_one_clear_error(call, match):
    index = CodeIndex(16, 8)
    index.append([6, 7], np.zeros((2, 16), np.uint8))
    with pytest.raises(UserError, match=match):
        call(index)


def test_bad_parameters():
    for kwargs, match in (({'m': 0, 'q': 8}, 'm must be'), ({'m': 8, 'q': 257}, 'q must be <= 256'),
                          ({'m': 8, 'q': 8, 'threads': 0}, 'threads'),
                          ({'m': 8, 'q': 8, 'block_size': True}, 'block_size')):
        with pytest.raises(UserError, match=match):
            CodeIndex(**kwargs)
