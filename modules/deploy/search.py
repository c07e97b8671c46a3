"""Fast exact 1:N identification over IoM hash codes.

The similarity of two IoM codes is the number of positions holding the same index (out of m).
`search` scans the gallery in chunks and keeps a running top-k per probe, so memory stays bounded
however large the gallery is.

How the scan is made fast (measured on 1,000,000 x 512 codes, q = 8, see
benchmarks/bench_search.py): comparing uint8 codes byte by byte costs about 40 ns per
(probe, gallery code) pair in numpy. Instead each gallery chunk is sliced once into bit planes
(plane b holds bit b of every index, packed 64 positions to a uint64 word) and stored transposed,
as (planes, words, codes), so that every numpy operation below runs over a long contiguous run of
gallery codes against one probe word broadcast as a scalar. Two indices differ iff any of their
bit planes differ, so

    mismatches = popcount(OR_b (gallery_plane_b XOR probe_plane_b)),  score = m - mismatches.

With q = 8 there are only 3 planes (192 bytes per code instead of 512), and the scan runs at about
12-16 ns per pair. Each chunk is read from memory and sliced once per `search` call; all probes
are then compared against it while it sits in cache (probes are taken in small blocks so the
temporaries also stay in cache). The number of planes is chosen per chunk from the largest index
present, so small q costs less and q up to 256 still works. With only one or two probes the
slicing does not pay for itself, and chunks are compared byte-wise instead.

A gallery kept in memory (`modules.deploy.index.CodeIndex`) stores its planes in this layout
(`code_planes`) once and hands them to `Scanner.compare` directly: no slicing per call.

The running top-k keeps one int64 key per candidate, mismatches * N + index: ordering keys is
ordering by (score descending, index ascending), and keys are unique, so np.partition followed by
a sort gives exactly the order a stable sort on (-score, index) would.
"""
import numpy as np

from modules.utils import UserError

DEFAULT_CHUNK_SIZE = 2048
# Pairs (probe x gallery code) handled by one numpy call: large enough to hide per-call overhead,
# small enough that the (pairs x words) uint64 temporaries stay in the L2 cache.
_PAIRS_PER_BLOCK = 32768
_WORD_BITS = 64
_DIRECT_MAX_PROBES = 2
_BYTE_MASK = np.uint64(0x00FF00FF00FF00FF)
_SUM_16BIT_LANES = np.uint64(0x0001000100010001)  # multiply: top 16 bits = sum of the 4 lanes
_MAX_M = 65534  # mismatch counts are uint16 and m + 1 is used as a sentinel


def pack_codes(codes, q=None, name='codes'):
    """Validate integer IoM codes of shape (N, m) with values in [0, q) and return them as uint8."""
    if q is not None:
        if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 1:
            raise UserError(f'{name}: q must be a positive integer, got {q!r}')
        if q > 256:
            raise UserError(f'{name}: q = {q} does not fit uint8 codes (q must be <= 256)')
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise UserError(f'{name}: expected a 2-D array (num_codes, m), got shape {arr.shape}')
    if arr.shape[1] == 0:
        raise UserError(f'{name}: code length m must be positive, got shape {arr.shape}')
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f'{name}: codes must be integers, got dtype {arr.dtype}')
    limit = 256 if q is None else int(q)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= limit:
            what = f'q = {q}' if q is not None else 'uint8 storage, q <= 256'
            raise UserError(f'{name}: index values must lie in [0, {limit}) ({what}); '
                            f'found values in [{lo}, {hi}]')
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _as_uint8(codes, name):
    """Return uint8 codes without a validation pass when they already are uint8."""
    arr = np.asarray(codes)
    if arr.dtype == np.uint8 and arr.ndim == 2 and arr.shape[1] > 0:
        return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
    return pack_codes(arr, name=name)


def plane_count(q):
    """Bit planes needed for indices in [0, q): 3 for q = 8 (at least 1)."""
    return max(1, (int(q) - 1).bit_length())


def code_planes(codes, num_planes, out=None, scratch=None):
    """uint8 codes (n, m) as bit planes (num_planes, words, n) uint64, the layout `Scanner.compare`
    scans: plane b, word w holds bit b of indices 64w..64w+63 of every code, codes contiguous.
    Written into `out` (a (num_planes, words, n) view) when given."""
    n, m = codes.shape
    words = -(-m // _WORD_BITS)
    if out is None:
        out = np.empty((num_planes, words, n), np.uint64)
    if scratch is None or scratch.shape[0] < n or scratch.shape[1] != words * _WORD_BITS:
        scratch = np.zeros((n, words * _WORD_BITS), np.uint8)
    # Padding columns stay zero on both sides, so they never count as a mismatch.
    buf = scratch[:n]
    for b in range(num_planes):
        np.bitwise_and(codes, np.uint8(1 << b), out=buf[:, :m])
        out[b] = np.packbits(buf, axis=1, bitorder='little').view(np.uint64).T
    return out


class Scanner:
    """Compute mismatch counts of all probes against gallery chunks, reusing scratch buffers."""

    def __init__(self, probes, chunk_size, planes_only=False):
        self.probes = probes
        self.m = probes.shape[1]
        self.num_probes = probes.shape[0]
        # With one or two probes, slicing each chunk into bit planes costs more than it saves:
        # compare the bytes directly (sums of 0/1 bytes in uint64 lanes need m % 8 == 0 and at
        # most 255 per byte lane, i.e. m <= 2040).
        self.direct = self.num_probes <= _DIRECT_MAX_PROBES and self.m % 8 == 0 \
            and self.m <= 8 * 255 and not planes_only
        if self.direct:
            self.equal = np.empty((self.num_probes, chunk_size, self.m), np.bool_)
            self.lanes = np.empty((self.num_probes, chunk_size), np.uint64)
            return
        self.words = -(-self.m // _WORD_BITS)
        self.probe_bits = int(probes.max()).bit_length() if probes.size else 0
        # All 8 planes for the probes (tiny), as (probes, planes, words); each chunk uses only
        # the planes it needs.
        self.probe_planes = np.ascontiguousarray(code_planes(probes, 8).transpose(2, 0, 1))
        self.block = int(np.clip(_PAIRS_PER_BLOCK // chunk_size, 1, max(1, self.num_probes)))
        self.scratch = np.zeros((chunk_size, self.words * _WORD_BITS), np.uint8)
        self.acc = np.empty((self.block, self.words, chunk_size), np.uint64)
        self.tmp = np.empty_like(self.acc)
        self.counts = np.empty((self.block, self.words, chunk_size), np.uint8)
        half = max(1, self.words // 2)
        self.half = np.empty((self.block, half, chunk_size), np.uint8)

    def mismatches(self, chunk):
        """Return (num_probes, len(chunk)) uint16 counts of differing indices."""
        if self.direct:
            return self._direct(chunk)
        planes_needed = max(1, self.probe_bits, int(chunk.max()).bit_length())
        return self.compare(code_planes(chunk, planes_needed, scratch=self.scratch))

    def compare(self, gal, out=None):
        """Mismatch counts (num_probes, c) uint16 against gallery planes (planes, words, c) that
        hold every bit set in the probes (a plane missing from `gal` must be zero in them);
        written into `out` when given."""
        planes_needed, _, c = gal.shape
        if planes_needed < self.probe_bits:
            raise ValueError(f'probes need {self.probe_bits} bit planes, the gallery has '
                             f'{planes_needed}')
        if out is None:
            out = np.empty((self.num_probes, c), np.uint16)
        w = self.words
        for p0 in range(0, self.num_probes, self.block):
            pp = self.probe_planes[p0:p0 + self.block]
            nb = pp.shape[0]
            acc, tmp = self.acc[:nb, :, :c], self.tmp[:nb, :, :c]
            np.bitwise_xor(gal[0][None], pp[:, 0, :, None], out=acc)
            for b in range(1, planes_needed):
                np.bitwise_xor(gal[b][None], pp[:, b, :, None], out=tmp)
                np.bitwise_or(acc, tmp, out=acc)
            counts = self.counts[:nb, :, :c]
            np.bitwise_count(acc, out=counts)
            if w >= 2:
                # Two popcounts of 64-bit words sum to at most 128: still exact in uint8, and the
                # halved array makes the widening uint16 sum cheaper.
                h = w // 2
                half = self.half[:nb, :h, :c]
                np.add(counts[:, :h], counts[:, h:2 * h], out=half)
                np.sum(half, axis=1, dtype=np.uint16, out=out[p0:p0 + nb])
                if w % 2:
                    out[p0:p0 + nb] += counts[:, w - 1]
            else:
                out[p0:p0 + nb] = counts[:, 0]
        return out

    def _direct(self, chunk):
        c = chunk.shape[0]
        equal = self.equal[:, :c]
        np.equal(chunk[None], self.probes[:, None, :], out=equal)
        lanes = self.lanes[:, :c]
        # Eight 0/1 bytes per uint64: summing the words adds per byte lane (at most m / 8 each).
        np.sum(equal.view(np.uint64), axis=2, out=lanes)
        pairs = (lanes & _BYTE_MASK) + ((lanes >> np.uint64(8)) & _BYTE_MASK)
        matches = (pairs * _SUM_16BIT_LANES) >> np.uint64(48)
        return (self.m - matches).astype(np.uint16)


def merge_topk(best, mism, start, n_total, k):
    """Fold one chunk's mismatch counts into the running best keys (in place)."""
    # A key mismatch * N + index orders by (score desc, index asc) and is unique per gallery code.
    # Chunks arrive in increasing index order, so a candidate only enters the top-k if its
    # mismatch count is strictly below the current k-th best (an equal count has a larger index).
    thr = (best.max(axis=1) // n_total).astype(mism.dtype)
    # Once the top-k has filled, most chunks improve few probes: find those first, cheaply.
    active = np.flatnonzero(mism.min(axis=1) < thr)
    if active.size == 0:
        return
    sub_rows, cols = np.nonzero(mism[active] < thr[active, None])
    rows = active[sub_rows]
    keys = mism[rows, cols].astype(np.int64) * n_total + (start + cols)
    urows, first, counts = np.unique(rows, return_index=True, return_counts=True)
    slot = np.arange(rows.size) - np.repeat(first, counts)
    which = np.repeat(np.arange(urows.size), counts)
    cand = np.full((urows.size, counts.max()), np.iinfo(np.int64).max, np.int64)
    cand[which, slot] = keys
    merged = np.concatenate([best[urows], cand], axis=1)
    best[urows] = np.partition(merged, k - 1, axis=1)[:, :k]


def search(gallery_codes, probe_codes, k, chunk_size=DEFAULT_CHUNK_SIZE):
    """Return (indices, scores) of the k best gallery codes per probe, each (num_probes, k).

    score = number of positions where the gallery code equals the probe code (0..m). Results are
    best first; ties in score are broken by the smaller gallery index, so the output is fully
    deterministic and independent of `chunk_size`. Codes are integer arrays (N, m) with values in
    [0, q), q <= 256 (uint8 input is used as it is; other integer dtypes are checked and packed
    with `pack_codes`). The gallery is processed `chunk_size` codes at a time, never as a
    (probes x N x m) array.
    """
    gallery = _as_uint8(gallery_codes, 'gallery_codes')
    probes = _as_uint8(probe_codes, 'probe_codes')
    n, m = gallery.shape
    if probes.shape[1] != m:
        raise UserError(f'search: probe codes have length m = {probes.shape[1]} but gallery codes '
                        f'have m = {m}')
    if m > _MAX_M:
        raise UserError(f'search: code length m = {m} is larger than the supported {_MAX_M}')
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise UserError(f'search: k must be an integer, got {k!r}')
    if not 1 <= k <= n:
        raise UserError(f'search: k = {k} must be between 1 and the gallery size N = {n}')
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise UserError(f'search: chunk_size must be a positive integer, got {chunk_size!r}')
    k, chunk_size = int(k), int(min(chunk_size, n))
    num_probes = probes.shape[0]
    if num_probes == 0:
        return np.empty((0, k), np.int64), np.empty((0, k), np.int64)

    scanner = Scanner(probes, chunk_size)
    # Sentinel keys: mismatch m + 1 is worse than any real code, so every real code beats them.
    best = np.full((num_probes, k), (m + 1) * n, np.int64)
    for start in range(0, n, chunk_size):
        mism = scanner.mismatches(gallery[start:start + chunk_size])
        merge_topk(best, mism, start, n, k)
    best.sort(axis=1)
    indices = best % n
    scores = m - best // n
    return indices, scores


def search_reference(gallery_codes, probe_codes, k):
    """Plain definition of `search` (score matrix + lexsort), for checks on small inputs only."""
    gallery = pack_codes(gallery_codes, name='gallery_codes').astype(np.int64)
    probes = pack_codes(probe_codes, name='probe_codes').astype(np.int64)
    scores = (probes[:, None, :] == gallery[None, :, :]).sum(axis=2)
    index = np.broadcast_to(np.arange(gallery.shape[0]), scores.shape)
    order = np.lexsort((index, -scores), axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)
