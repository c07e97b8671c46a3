"""The state behind the service: the gallery on its database thread, the hashing model and its
batcher on the model thread, and the way from an uploaded photo to a code."""
import asyncio
import base64
import concurrent.futures
import dataclasses
import io
import os
import threading

import numpy as np
from fastapi import HTTPException

from modules.align import face_crop, read_photo
from modules.deploy import attempts
from modules.deploy.attempts import Limits
from modules.deploy.changelog import ChangeWatcher
from modules.deploy.hashing import Hasher
from modules.deploy.service.batcher import Batcher
from modules.deploy.service.bucket import BURST, RATE, TokenBucket
from modules.deploy.store import is_postgres
from modules.utils import UserError

_SOURCE_CHARS = 100


@dataclasses.dataclass
class Settings:
    """What serve.py passes to the app."""

    threshold: float
    threshold_source: str
    max_upload_bytes: int = 10 * 2 ** 20
    max_pixels: int = 40_000_000
    align: str = 'auto'
    max_batch: int = 64
    batch_wait_s: float = 0.030
    expose_scores: bool = False  # distances (and threshold, template count) in the answers
    subject_limits: Limits = Limits()  # verify and further templates, per subject
    # identify probes, per token
    identify_limits: Limits = Limits(max_failures=attempts.MAX_IDENTIFY_FAILURES)
    rate: float = RATE  # per-token bucket; 0: none
    burst: int = BURST

    def limits(self):
        """The limits as /healthz shows them."""
        return {'max_failures': self.subject_limits.max_failures,
                'lockout_s': self.subject_limits.lockout_s,
                'max_lockout_s': self.subject_limits.max_lockout_s,
                'max_identify_failures': self.identify_limits.max_failures,
                'rate': self.rate, 'burst': self.burst}


class Service:
    """The state behind the app: gallery (database thread), hasher and batcher (model thread)."""

    def __init__(self, gallery, hasher, cfg, settings):
        # An SQLite connection belongs to the thread that opened it: the gallery is opened again
        # on the database thread, which then makes every gallery call.
        self.db_thread = concurrent.futures.ThreadPoolExecutor(1, 'gallery')
        self.gallery = self.db_thread.submit(gallery.reopen).result()
        gallery.close()
        self.hasher = hasher.trace()
        self.hasher_key_id = self.gallery.meta['key_id']
        if self.hasher_key_id != gallery.meta['key_id']:
            raise UserError(f'{gallery.db_path} was re-keyed while the service started: start it '
                            'again')
        self.cfg = cfg
        self.settings = settings
        self.auth_gallery = None  # opened by the app's lifespan, on the event loop's thread
        self.batcher = Batcher(self._hash_faces, settings.max_batch, settings.batch_wait_s)
        self.bucket = TokenBucket(settings.rate, settings.burst) if settings.rate else None
        self.watcher = None
        self._sync_queued = threading.Lock()  # held while a change-log catch-up is queued

    def _limits(self, scope):
        return (self.settings.subject_limits if scope == 'subject' else
                self.settings.identify_limits)

    async def refuse_if_locked(self, scope, name):
        """429 (attempts.Locked) at once for a subject or token locked out now, before its
        photo is hashed."""
        if self._limits(scope).on:
            await self.db(attempts.check, self.gallery, scope, name)

    def settle(self, scope, name, matched, what):
        """On the database thread: count one decided attempt (attempts.settle); Locked when its
        answer may not be given."""
        limits = self._limits(scope)
        if limits.on:
            attempts.settle(self.gallery, scope, name, matched, limits, what)

    def start_index(self):
        """Load the code index before the first request (application keys) and, on PostgreSQL,
        follow the gallery's changes as they commit (LISTEN/NOTIFY) rather than only when a
        request comes; the per-request catch-up of `Gallery.identify` stays as the guarantee."""
        if self.gallery.subject_keys:
            return
        try:
            self.db_thread.submit(self.gallery.sync_index).result()
        except UserError:
            pass  # e.g. the database is down: the first identify loads it, or answers 503
        if is_postgres(self.gallery.db_path):
            self.watcher = ChangeWatcher(self.gallery.db_path, self._sync_soon).start()

    def stop_index(self):
        """Stop following the gallery's changes."""
        if self.watcher is not None:
            self.watcher.stop()

    def _sync_soon(self):
        # From the watcher's thread: one catch-up queued on the database thread at a time.
        if self._sync_queued.acquire(blocking=False):
            try:
                self.db_thread.submit(self._sync_now)
            except RuntimeError:  # shutting down
                self._sync_queued.release()

    def _sync_now(self):
        self._sync_queued.release()
        try:
            self.gallery.sync_index()
        except UserError:
            pass  # the database is down or being re-keyed: the next request reports it

    def _hash_faces(self, faces, subject_keys):
        # Runs on the model thread, as does a rekey's model swap: the key id names the key used.
        # Subject keys: one embedding pass for the batch, then each row under its own key.
        if self.gallery.subject_keys:
            return self.hasher.subject_codes(self.hasher.embeddings(faces), subject_keys), \
                self.hasher_key_id
        return self.hasher.codes(faces), self.hasher_key_id

    def swap_hasher(self, key, kid):
        """Hash with the model under `key` (id `kid`) from now on; runs on the model thread."""
        if kid != self.hasher_key_id:  # several requests may ask for the same swap
            self.hasher = Hasher(self.cfg, key).trace()
            self.hasher_key_id = kid

    async def db(self, fn, *args):
        """Run fn(*args) on the database thread."""
        return await asyncio.get_running_loop().run_in_executor(self.db_thread, fn, *args)

    async def fresh(self, fn, *args):
        """fn(*args) on the database thread after catching up with other processes' writes;
        a rekey made elsewhere then swaps the model to the new key (KeyChanged: 409)."""
        def call():
            self.gallery.refresh()
            return fn(*args)
        try:
            return await self.db(call)
        finally:
            kid = self.gallery.meta['key_id']
            if kid != self.hasher_key_id:
                await self.batcher.run_on_model_thread(self.swap_hasher, self.gallery.key, kid)

    async def probe(self, upload, want_crop=False, subject_key=None):
        """(code, key id, crop data URL or None) of an uploaded photo; 413/422 for a bad image."""
        source = upload_name(upload)
        with self.batcher.photo():
            data = await upload.read()
            face = await asyncio.get_running_loop().run_in_executor(
                None, self._face, data, source)
            code, kid = await self.batcher.code(face, subject_key)
        return code, kid, (_data_url(face) if want_crop else None)

    def _face(self, data, source):
        size = _pixel_size(data, source)
        if size is not None and size[0] * size[1] > self.settings.max_pixels:
            raise HTTPException(413, f'{source}: {size[0]}x{size[1]} pixels, over --max_pixels '
                                f'{self.settings.max_pixels}')
        try:
            image = read_photo(io.BytesIO(data), source=source)
            return face_crop(image, self.cfg['input_size'], self.settings.align, source=source)
        except UserError as err:  # FaceError, or landmarks that fix no alignment: the photo's
            raise HTTPException(422, str(err)) from None


def upload_name(upload):
    """The upload's file name as shown in messages and the audit: printable, short."""
    name = os.path.basename(upload.filename or '') or 'image'
    return ''.join(c if c.isprintable() else '?' for c in name)[:_SOURCE_CHARS]


def _pixel_size(data, source):
    """(width, height) from the image header, None when PIL cannot tell (read_photo says why)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Image.DecompressionBombError as err:  # PIL's own, larger limit
        raise HTTPException(413, f'{source}: image too large ({err})') from None
    except Exception:  # not an image / damaged: read_photo gives the user-facing message
        return None


def _data_url(face):
    import cv2
    ok, buf = cv2.imencode('.png', np.ascontiguousarray(face[:, :, ::-1]))
    return 'data:image/png;base64,' + base64.b64encode(buf.tobytes()).decode() if ok else None
