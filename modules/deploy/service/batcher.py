"""Micro-batching of photos for the model: one model call for the faces that arrive together."""
import asyncio
import concurrent.futures
import contextlib
import time

import numpy as np

_PEAK_WINDOW_S = 0.25


class Batcher:
    """Micro-batching: `code(face)` awaits the code of one aligned face. Faces that arrive while
    the model is busy are hashed together in one model call on the model thread, off the event
    loop. When the model is free, a batch waits (up to `wait_s`) until it holds as many photos as
    were recently waiting for the model at once (`photo()` counts them): with concurrent clients
    the ones just answered are on their way back, and one call for all of them beats two
    half-full ones. A lone client's photo goes to the model at once."""

    def __init__(self, hash_faces, max_batch, wait_s):
        self.hash_faces = hash_faces
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.queue = asyncio.Queue()
        self.model_thread = concurrent.futures.ThreadPoolExecutor(1, 'model')
        self.task = None
        self.batches = 0
        self.hashed = 0
        self.waiting = 0  # photos between decoding and their code
        # Most photos waiting at once in this quarter second and the one before (longer than a
        # batch cycle, short enough that a lone client after a burst soon stops waiting).
        self._peaks = [0, 0]
        self._window_ends = 0.0

    def _count(self, delta):
        now = time.monotonic()
        if now > self._window_ends:
            self._peaks = [0, self._peaks[0]]
            self._window_ends = now + _PEAK_WINDOW_S
        self.waiting += delta
        self._peaks[0] = max(self._peaks[0], self.waiting)

    @contextlib.contextmanager
    def photo(self):
        """Around the decoding and hashing of one photo: batches expect it."""
        self._count(1)
        try:
            yield
        finally:
            self._count(-1)

    def start(self):
        """Start the batching loop on the running event loop."""
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self):
        """Stop the loop; waiting requests get an error."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        while not self.queue.empty():
            *_, future = self.queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError('the service is stopping'))
        self.model_thread.shutdown(wait=True)

    async def code(self, face, subject_key=None):
        """(uint8 code (m,), key id it was made under) of one aligned face, under the gallery's
        key or, in a subject-key gallery, the request's `subject_key`."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((face, subject_key, future))
        return await future

    async def run_on_model_thread(self, fn, *args):
        """Run `fn` on the model thread, between batches (used to swap the model on rekey)."""
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                if self.queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0 or len(batch) >= max(self._peaks):
                        break
                    try:
                        batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                    except TimeoutError:
                        break
                else:
                    batch.append(self.queue.get_nowait())
            live = [item for item in batch if not item[-1].cancelled()]
            if not live:
                continue
            try:
                codes, kid = await loop.run_in_executor(
                    self.model_thread, self.hash_faces, np.stack([face for face, _, _ in live]),
                    [key for _, key, _ in live])
            except Exception as err:  # the model failed: every waiter hears it, the loop goes on
                for *_, fut in live:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            self.batches += 1
            self.hashed += len(live)
            for (*_, fut), code in zip(live, codes):
                if not fut.done():
                    fut.set_result((code, kid))
