"""The verification service: a FastAPI app over one `Gallery` and its `Hasher` (serve.py runs it).

Requests are checked (bearer token, body size, pixel count), the photo is decoded and aligned in
a worker thread, hashed by the micro-batching queue (photos arriving within `batch_wait_ms` go
through the model in one call, on a thread of its own), and decided by the same `Gallery` methods
and threshold as gallery.py. Every gallery call runs on one database thread (an SQLite connection
belongs to one thread), except the token lookup, which reads on the event loop's own connection;
writes from other processes (gallery.py, `serve.py token`, other serve.py instances on the same
PostgreSQL gallery) are seen on the next request: each request first catches up with the
gallery's generation, and a rekey made elsewhere swaps this instance's model to the new key
(read from the key file). A database that cannot be reached gives 503 until it is back.

What never leaves the process: the application key, tokens (only their SHA-256 is stored and a
presented token is only hashed), embeddings. Error bodies are one line, `{"detail": ...}`.
"""
import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import os
import time

import numpy as np
from fastapi import Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from modules.align import face_crop, read_photo
from modules.gallery import (
    DatabaseUnavailable,
    KeyChanged,
    NotEnrolled,
    accepts,
    check_name,
    new_key,
    token_role,
)
from modules.hashing import Hasher
from modules.utils import UserError

log = logging.getLogger('iomface.service')
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
_MAX_TOP_K = 100
_PEAK_WINDOW_S = 0.25
_SOURCE_CHARS = 100
_REKEYED = ('the gallery was re-keyed while this request was processed: send it again')


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


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, from Content-Length before anything is
    read, else as soon as the streamed body passes the limit (never read whole)."""

    def __init__(self, app, limit):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        """Refuse or pass on one request."""
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        length = dict(scope['headers']).get(b'content-length')
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            response = JSONResponse(_too_large(self.limit) if length.isdigit() else
                                    {'detail': 'Content-Length is not a number'},
                                    413 if length.isdigit() else 400)
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get('body', b''))
            if seen > self.limit:
                # FastAPI lets an HTTPException raised while reading the form through to its
                # handler, so the client gets a 413 (and the connection is closed).
                raise HTTPException(413, _too_large(self.limit)['detail'])
            return message

        return await self.app(scope, counted, send)


def _too_large(limit):
    return {'detail': f'upload larger than --max_upload_mb {limit / 2 ** 20:g} MB'}


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

    def _hash_faces(self, faces, subject_keys):
        # Runs on the model thread, as does a rekey's model swap: the key id names the key used.
        # Subject keys: one embedding pass for the batch, then each row under its own key.
        if self.gallery.subject_keys:
            return self.hasher.subject_codes(self.hasher.embeddings(faces), subject_keys), \
                self.hasher_key_id
        return self.hasher.codes(faces), self.hasher_key_id

    def _swap_hasher(self, key, kid):
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
                await self.batcher.run_on_model_thread(self._swap_hasher, self.gallery.key, kid)

    async def probe(self, upload, want_crop=False, subject_key=None):
        """(code, key id, crop data URL or None) of an uploaded photo; 413/422 for a bad image."""
        source = _upload_name(upload)
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


def _subject_key(gallery, text, required):
    """The request's subject key (an int) in a subject-key gallery, None otherwise; 422 when it
    is missing where required, malformed, or sent to an application-key gallery. The key itself
    is never put in a message."""
    if not gallery.subject_keys:
        if text is not None:
            raise HTTPException(422, 'subject_key: this gallery uses one application key; send '
                                'no subject key')
        return None
    if text is None:
        if required:
            raise HTTPException(422, 'subject_key: required in a subject-key gallery (the hex '
                                "key issued at the subject's enrolment)")
        return None
    try:
        key = int(text.strip(), 16)
    except ValueError:
        raise HTTPException(422, 'subject_key: not a hexadecimal key') from None
    if key < 0:
        raise HTTPException(422, 'subject_key: not a hexadecimal key')
    return key


def _check_name(name):
    try:
        check_name(name)
    except UserError as err:
        raise HTTPException(422, str(err)) from None


def _upload_name(upload):
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


def _bearer(request):
    header = request.headers.get('authorization', '')
    scheme, _, token = header.partition(' ')
    if scheme.lower() != 'bearer' or not token.strip():
        raise HTTPException(401, 'missing bearer token: send the header "Authorization: Bearer '
                            '<token>" (tokens are made with `serve.py token add`)',
                            {'WWW-Authenticate': 'Bearer'})
    return token.strip()


def _role_checker(required):
    async def check(request: Request):
        service = request.app.state.service
        # A lookup of a few rows on the event loop's own connection (WAL: readers never wait
        # for writers) costs less than a hop to the database thread, and sees revocations at once.
        role = token_role(service.auth_gallery, _bearer(request))
        if role is None:
            raise HTTPException(401, 'invalid or revoked token', {'WWW-Authenticate': 'Bearer'})
        if required == 'admin' and role != 'admin':
            raise HTTPException(403, 'this needs an admin token')
        return role
    return check


client_auth = Depends(_role_checker('client'))
admin_auth = Depends(_role_checker('admin'))
IMAGE = File(..., description='face photo (aligned on the fly unless it is an input_size crop)')
WANT_CROP = Form(False, description='also return the aligned crop as a PNG data URL')
SUBJECT_KEY = Form(None, description="subject-key galleries only: the subject's key (hex), as "
                   'issued at enrolment; never stored or logged')


def create_app(gallery, hasher, cfg, settings):
    """The FastAPI app serving the gallery of `gallery` (which it takes over and closes) with
    `hasher` (built under the gallery's key)."""
    service = Service(gallery, hasher, cfg, settings)
    gallery = service.gallery

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.auth_gallery = gallery.reopen()  # on the event loop's thread
        service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.stop()
            await service.db(gallery.close)
            service.db_thread.shutdown(wait=True)
            service.auth_gallery.close()

    # FastAPIOffline: FastAPI whose /docs page serves Swagger UI from this server, not a CDN.
    app = FastAPIOffline(title='IoMFace verification service', lifespan=lifespan,
                  description='Protected-template (IoM hash) face verification. Send '
                  '`Authorization: Bearer <token>`; tokens come from `serve.py token add`.')
    app.state.service = service
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    _error_handlers(app)

    @app.get('/healthz')
    async def healthz():
        """Liveness and what is served: template count, code size, model and key ids, threshold,
        photos hashed and model calls so far (their ratio is the mean batch size)."""
        count = await service.db(gallery.count)
        return {'status': 'ok', 'templates': count, 'm': gallery.m, 'q': gallery.q,
                'model_fingerprint': gallery.meta['model_fp'], 'key_id': gallery.meta['key_id'],
                'threshold': settings.threshold, 'photos_hashed': service.batcher.hashed,
                'model_calls': service.batcher.batches}

    @app.post('/v1/subjects/{name}/templates', status_code=201, dependencies=[admin_auth])
    async def enroll(name: str, image: UploadFile = IMAGE, return_crop: bool = WANT_CROP,
                     subject_key: str | None = SUBJECT_KEY):
        """Enrol one photo of `name` (a new subject or one more template). In a subject-key
        gallery a new subject gets a fresh key, returned once as `subject_key` (hex) and never
        stored; another template of an enrolled subject needs that key."""
        _check_name(name)
        key = _subject_key(gallery, subject_key, required=False)
        issued = gallery.subject_keys and key is None
        if issued:
            key = new_key()
        code, kid, crop = await service.probe(image, return_crop, key)

        def write():
            if kid != gallery.meta['key_id']:
                raise HTTPException(409, _REKEYED)
            try:
                # made_under: checked inside the transaction against a rekey by another instance.
                gallery.enroll(name, code[None], [f'upload:{_upload_name(image)}'],
                               subject_key=key, made_under=kid)
            except UserError as err:
                if 'another key' in str(err):  # an enrolled subject, a new or wrong key
                    raise HTTPException(409, str(err)) from None
                raise
            return len(gallery.templates_of(name))
        templates = await service.fresh(write)
        body = {'name': name, 'templates': templates}
        if issued:
            body['subject_key'] = f'{key:x}'
        return _with_crop(body, crop)

    @app.get('/v1/subjects', dependencies=[admin_auth])
    async def subjects():
        """Every enrolled subject with its number of templates and enrolment times (UNIX s)."""
        rows = await service.db(gallery.subjects)
        return {'subjects': [{'name': n, 'templates': c, 'first_enrolled': f, 'last_enrolled': last}
                             for n, c, f, last in rows]}

    @app.delete('/v1/subjects/{name}', dependencies=[admin_auth])
    async def revoke(name: str):
        """Delete every template of `name` (404 when not enrolled)."""
        return {'name': name, 'deleted': await service.db(gallery.revoke, name)}

    @app.post('/v1/verify', dependencies=[client_auth])
    async def verify(name: str = Form(..., description='claimed subject'),
                     image: UploadFile = IMAGE, return_crop: bool = WANT_CROP,
                     subject_key: str | None = SUBJECT_KEY):
        """1:1 — is this photo `name`? The smallest Hamming distance to its templates. In a
        subject-key gallery the subject's key comes with the request; a wrong key never
        matches."""
        key = _subject_key(gallery, subject_key, required=True)
        code, kid, crop = await service.probe(image, return_crop, key)

        def decide():
            if kid != gallery.meta['key_id']:
                raise HTTPException(409, _REKEYED)
            return gallery.verify(name, code), gallery.key_matches(name, key)
        distance, key_ok = await service.fresh(decide)
        body = {'name': name, 'distance': distance, 'm': gallery.m,
                'threshold': settings.threshold,
                'match': bool(key_ok and accepts(distance, settings.threshold))}
        if gallery.subject_keys:
            body['key_matches'] = bool(key_ok)
        return _with_crop(body, crop)

    @app.post('/v1/identify', dependencies=[client_auth])
    async def identify(image: UploadFile = IMAGE,
                       top_k: int = Form(5, ge=1, le=_MAX_TOP_K, description='candidates'),
                       return_crop: bool = WANT_CROP):
        """1:N — the top_k closest templates, best first, each with its decision (not in a
        subject-key gallery: 409)."""
        _refuse_in_subject_mode(gallery.check_can_identify)
        code, kid, crop = await service.probe(image, return_crop)

        def search():
            if kid != gallery.meta['key_id']:
                raise HTTPException(409, _REKEYED)
            return gallery.identify(code, top_k), gallery.count()
        found, templates = await service.fresh(search)
        return _with_crop({'threshold': settings.threshold, 'templates': templates, 'candidates': [
            {'name': n, 'distance': d, 'match': bool(accepts(d, settings.threshold))}
            for n, d, _ in found]}, crop)

    @app.post('/v1/rekey', dependencies=[admin_auth])
    async def rekey():
        """New application key: every template is deleted, every subject must enrol again (not
        in a subject-key gallery: 409)."""
        _refuse_in_subject_mode(gallery.check_can_rekey)
        old = gallery.meta['key_id']
        deleted = await service.fresh(gallery.rekey)
        await service.batcher.run_on_model_thread(service._swap_hasher, gallery.key,
                                                  gallery.meta['key_id'])
        return {'old_key_id': old, 'key_id': gallery.meta['key_id'], 'deleted': deleted}

    @app.get('/', include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC_DIR, 'index.html'), headers=_PAGE_HEADERS)

    app.mount('/static', StaticFiles(directory=STATIC_DIR), name='static')
    return app


# The page may load only what this server serves (and show what the camera or a picked file
# gives): a browser fetches nothing from elsewhere, whatever the page's script tries.
_PAGE_HEADERS = {'Content-Security-Policy': "default-src 'self'; img-src 'self' data: blob:; "
                 "media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                 "frame-ancestors 'none'", 'Cache-Control': 'no-store'}


def _refuse_in_subject_mode(check):
    """409 with the gallery's own one-line reason when `check()` refuses (subject-key mode)."""
    try:
        check()
    except UserError as err:
        raise HTTPException(409, str(err)) from None


def _with_crop(body, crop):
    if crop is not None:
        body['crop'] = crop
    return body


def _error_handlers(app):
    """One-line JSON errors: client mistakes get 4xx with the reason, anything else a plain 500
    (the traceback goes to the server log only)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err):
        # Say which field is wrong, never echo what was sent (it may hold a key one day).
        problems = []
        for e in err.errors():
            where = '.'.join(str(p) for p in e.get('loc', ()) if p not in ('body', 'query'))
            problems.append(f"{where or 'request'}: {e.get('msg', 'invalid')}")
        return JSONResponse({'detail': '; '.join(problems) or 'invalid request'}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        # FastAPI answers 400 when it cannot parse a form or JSON body: that is a malformed
        # request, 422 like every other unusable input.
        status = 422 if err.status_code == 400 else err.status_code
        return JSONResponse({'detail': str(err.detail)}, status, headers=err.headers)

    @app.exception_handler(NotEnrolled)
    async def not_enrolled(request, err):
        return JSONResponse({'detail': str(err)}, 404)

    @app.exception_handler(KeyChanged)
    async def rekeyed(request, err):
        return JSONResponse({'detail': _REKEYED}, 409)

    @app.exception_handler(DatabaseUnavailable)
    async def unavailable(request, err):
        log.error('%s %s: %s', request.method, request.url.path, err)
        return JSONResponse({'detail': 'the gallery database is unreachable: try again shortly'},
                            503, headers={'Retry-After': '1'})

    @app.exception_handler(UserError)
    async def server_side(request, err):
        # The client's mistakes (photo, name) are turned into 4xx where they are found; a
        # UserError that gets here is the server's (e.g. a damaged database): say so, log it.
        log.error('%s %s: %s', request.method, request.url.path, err)
        return JSONResponse({'detail': 'the gallery is unavailable (see the server log)'}, 503)

    @app.exception_handler(Exception)
    async def unexpected(request, err):
        log.exception('unexpected error on %s %s', request.method, request.url.path)
        return JSONResponse({'detail': 'internal error (see the server log)'}, 500)
