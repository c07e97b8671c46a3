"""The in-memory code index of a gallery: codes kept as packed bit planes and searched in place.

`search.search` slices a uint8 code matrix into bit planes on every call. A `CodeIndex` keeps the
planes instead (the `search.code_planes` layout; 3 planes for q = 8: 96 bytes per code at m = 256,
192 at m = 512), built once, so a query reads only them. One probe costs one pass over the planes,
spread over threads: numpy releases the GIL inside each call, so threads scanning different
chunks run on different cores. Each thread takes the next span of codes from a shared counter, so
its spans come in increasing order and its running top-k stays exact (see `search.merge_topk`);
the threads' top-k lists are merged at the end.

Storage: blocks of `block_size` codes, each a (planes, words, block_size) uint64 array. Appending
fills the last block and opens a new one when it is full, so growing never copies the planes and
at most one block is partly used. The template ids sit beside the slots in increasing order (a
gallery's ids grow with its enrolments), so `remove` finds them by binary search. A removed code
is a tombstone (its slot is skipped by the scan) until the dead slots pass `COMPACT_FRACTION` of
the index, which is then rebuilt without them.

Results are exactly those of `search.search_reference` on the live codes in id order, mapped to
their ids: best score first, ties broken by the smaller id.
"""
import concurrent.futures
import itertools
import os
import threading

import numpy as np

from modules.deploy.search import Scanner, code_planes, merge_topk, pack_codes, plane_count
from modules.utils import UserError

DEFAULT_BLOCK_SIZE = 65536
# Codes per numpy call: the (words x chunk) uint64 temporaries of a scan stay in the L2 cache.
DEFAULT_CHUNK_SIZE = 4096
# Codes whose mismatch counts are folded into the running top-k at once (one probe): the merge
# costs a dozen small numpy calls, so it runs once per span rather than once per chunk.
_SPAN = 65536
_FILL_CHUNK = 1024  # codes sliced into planes at a time: its temporaries stay in the L2 cache
COMPACT_FRACTION = 0.2
_GROWTH = 1.25  # capacity step of the id and liveness arrays (the planes grow by blocks)
_POOL = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


class OutOfOrder(UserError):
    """Template ids that do not come after the ids already held (see `CodeIndex.append`)."""


def default_threads():
    """The number of cores this process may run on."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_pool(threads):
    """The shared scan threads, at least `threads` of them (one pool for every index)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL_SIZE < threads:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL, _POOL_SIZE = concurrent.futures.ThreadPoolExecutor(threads, 'code-index'), threads
        return _POOL


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f'CodeIndex: {name} must be a positive integer, got {value!r}')
    return int(value)


class CodeIndex:
    """Gallery codes as bit planes with their template ids: append, remove, search."""

    def __init__(self, m, q, block_size=DEFAULT_BLOCK_SIZE, chunk_size=DEFAULT_CHUNK_SIZE,
                 threads=None):
        self.m, self.q = _positive('m', m), _positive('q', q)
        if self.q > 256:
            raise UserError(f'CodeIndex: q = {q} does not fit uint8 codes (q must be <= 256)')
        self.block_size = _positive('block_size', block_size)
        self.chunk_size = _positive('chunk_size', chunk_size)
        self.threads = _positive('threads', default_threads() if threads is None else threads)
        self.num_planes = plane_count(self.q)
        self.words = -(-self.m // 64)
        self._blocks = []
        self._block_dead = np.zeros(0, np.int64)
        self._ids = np.zeros(0, np.int64)
        self._alive = np.zeros(0, np.bool_)
        self._size = 0  # slots used, dead ones included
        self._dead = 0
        self._lock = threading.RLock()

    def __len__(self):
        return self._size - self._dead

    @property
    def bytes_per_code(self):
        """Bytes of bit planes per code (96 at m = 256, q = 8)."""
        return self.num_planes * self.words * 8

    def allocated_bytes(self):
        """Bytes held by the planes, ids and liveness arrays (allocated, used or not)."""
        return sum(b.nbytes for b in self._blocks) + self._ids.nbytes + self._alive.nbytes

    def ids(self):
        """Template ids of the live codes, increasing."""
        with self._lock:
            return self._ids[:self._size][self._alive[:self._size]].copy()

    # -- changes ------------------------------------------------------------------------------
    def append(self, ids, codes):
        """Add codes (n, m) under template ids, increasing and above every id held (trailing
        removed slots with ids not below the new ones are dropped, as after a rowid reuse)."""
        codes = self._checked(codes, 'codes')
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) != len(codes) or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f'CodeIndex.append: need one integer id per code, got ids of shape '
                            f'{ids.shape} for {len(codes)} codes')
        ids = ids.astype(np.int64)
        if not len(ids):
            return
        if np.any(ids[1:] <= ids[:-1]):
            raise OutOfOrder('CodeIndex.append: template ids must increase')
        with self._lock:
            self._drop_dead_tail(ids[0])
            self._reserve(len(ids))
            self._ids[self._size:self._size + len(ids)] = ids
            self._alive[self._size:self._size + len(ids)] = True
            for block, off, start, count in self._new_slots(len(ids)):
                for s in range(0, count, _FILL_CHUNK):
                    part = codes[start + s:start + min(count, s + _FILL_CHUNK)]
                    code_planes(part, self.num_planes,
                                out=block[:, :, off + s:off + s + len(part)])

    def remove(self, ids):
        """Tombstone the live codes of these template ids (others are ignored); the count."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise UserError(f'CodeIndex.remove: need a 1-D array of integer ids, got {ids.dtype} '
                            f'of shape {ids.shape}')
        ids = ids.astype(np.int64)
        with self._lock:
            held = self._ids[:self._size]
            pos = np.searchsorted(held, ids)
            inside = pos < self._size
            pos, ids = pos[inside], ids[inside]
            pos = np.unique(pos[(held[pos] == ids) & self._alive[pos]])
            self._alive[pos] = False
            self._dead += len(pos)
            self._block_dead += np.bincount(pos // self.block_size,
                                            minlength=len(self._blocks))
            if self._dead > COMPACT_FRACTION * self._size:
                self.compact()
            return len(pos)

    def compact(self):
        """Rebuild the blocks without the removed codes (order kept)."""
        with self._lock:
            keep = np.flatnonzero(self._alive[:self._size])
            old, bs = self._blocks, self.block_size
            bounds = np.searchsorted(keep, np.arange(len(old) + 1) * bs)
            self._blocks, self._block_dead = [], np.zeros(0, np.int64)
            self._ids, self._size, self._dead = self._ids[keep], 0, 0
            self._alive = np.ones(len(keep), np.bool_)
            for i in range(len(old)):
                cols = keep[bounds[i]:bounds[i + 1]] - i * bs
                planes, old[i] = old[i][:, :, cols], None  # the old block goes as it is copied
                for block, off, start, count in self._new_slots(len(cols)):
                    block[:, :, off:off + count] = planes[:, :, start:start + count]

    def _checked(self, codes, name):
        arr = np.asarray(codes)
        if arr.dtype != np.uint8:
            arr = pack_codes(arr, self.q, name)
        elif arr.ndim != 2:
            raise UserError(f'{name}: expected a 2-D array (num_codes, m), got shape {arr.shape}')
        elif arr.size and int(arr.max()) >= self.q:  # uint8: no value below 0, one pass
            raise UserError(f'{name}: index values must lie in [0, {self.q}) (q = {self.q}); '
                            f'found {int(arr.max())}')
        if arr.shape[1] != self.m:
            raise UserError(f'{name}: codes have length m = {arr.shape[1]}, the index holds '
                            f'm = {self.m}')
        return np.ascontiguousarray(arr)

    def _drop_dead_tail(self, first_new):
        """Forget trailing dead slots whose ids are >= first_new; refuse if a live one is."""
        cut = int(np.searchsorted(self._ids[:self._size], first_new))
        if cut == self._size:
            return
        if self._alive[cut:self._size].any():
            raise OutOfOrder(f'CodeIndex.append: template id {first_new} is not above the ids '
                             'already held')
        dropped = np.bincount(np.arange(cut, self._size) // self.block_size,
                              minlength=len(self._blocks))
        self._block_dead -= dropped
        self._dead -= self._size - cut
        self._size = cut
        used = -(-cut // self.block_size)
        del self._blocks[used:]
        self._block_dead = self._block_dead[:used]

    def _reserve(self, n):
        need = self._size + n
        if need > len(self._ids):
            cap = max(need, int(len(self._ids) * _GROWTH), 1024)
            self._ids = np.concatenate([self._ids[:self._size],
                                        np.zeros(cap - self._size, np.int64)])
            self._alive = np.concatenate([self._alive[:self._size],
                                          np.zeros(cap - self._size, np.bool_)])

    def _new_slots(self, n):
        """Yield (block, offset, start, count) runs covering n new slots, allocating blocks; each
        run counts as used once the caller has filled it."""
        start = 0
        while start < n:
            b, off = divmod(self._size, self.block_size)
            if b == len(self._blocks):
                # np.empty: pages of the unused tail are never touched, so never resident.
                self._blocks.append(np.empty((self.num_planes, self.words, self.block_size),
                                             np.uint64))
                self._block_dead = np.append(self._block_dead, 0)
            count = min(self.block_size - off, n - start)
            yield self._blocks[b], off, start, count
            self._size += count
            start += count

    # -- search -------------------------------------------------------------------------------
    def search(self, probes, k):
        """(ids, scores) of the k best live codes per probe, each (num_probes, k), best first;
        score = number of equal positions, ties broken by the smaller id."""
        probes = self._checked(np.atleast_2d(probes), 'probe codes')
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise UserError(f'CodeIndex.search: k must be an integer, got {k!r}')
        with self._lock:
            if not 1 <= k <= len(self):
                raise UserError(f'CodeIndex.search: k = {k} must be between 1 and the number of '
                                f'codes held, {len(self)}')
            k = int(k)
            if not len(probes):
                return np.empty((0, k), np.int64), np.empty((0, k), np.int64)
            spans = self._spans(len(probes))
            threads = min(self.threads, len(spans))
            taken = itertools.count()  # each thread takes the next span: increasing order
            if threads == 1:
                results = [self._scan(probes, spans, taken, k)]
            else:
                pool = thread_pool(threads)
                results = [f.result() for f in [pool.submit(self._scan, probes, spans, taken, k)
                                                for _ in range(threads)]]
            best = np.sort(np.concatenate(results, axis=1), axis=1)[:, :k]
            slots = best % self._size
            return self._ids[slots], self.m - best // self._size

    def _spans(self, num_probes):
        """(block number, first slot, end slot) runs of at most one span within a block."""
        step = max(self.chunk_size, _SPAN // max(1, num_probes) // self.chunk_size
                   * self.chunk_size)
        out = []
        for b in range(len(self._blocks)):
            end = min(self.block_size, self._size - b * self.block_size)
            out += [(b, c0, min(end, c0 + step)) for c0 in range(0, end, step)]
        return out

    def _scan(self, probes, spans, taken, k):
        """Running top-k keys (mismatches * slots + slot) of the spans this thread takes."""
        n_total, m, bs, cs = self._size, self.m, self.block_size, self.chunk_size
        scanner = Scanner(probes, cs, planes_only=True)
        best = np.full((len(probes), k), (m + 1) * n_total, np.int64)
        mism = np.empty((len(probes), max(end - start for _, start, end in spans)), np.uint16)
        for i in taken:
            if i >= len(spans):
                break
            b, c0, c1 = spans[i]
            block, out = self._blocks[b], mism[:, :c1 - c0]
            for s in range(c0, c1, cs):
                e = min(c1, s + cs)
                scanner.compare(block[:, :, s:e], out=out[:, s - c0:e - c0])
            if self._block_dead[b]:  # a removed code can never beat a live one
                out[:, ~self._alive[b * bs + c0:b * bs + c1]] = m + 1
            merge_topk(best, out, b * bs + c0, n_total, k)
        return best
