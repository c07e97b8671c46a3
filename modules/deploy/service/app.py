"""The verification service: a FastAPI app over one `Gallery` and its `Hasher` (serve.py runs it).

This module only wires the parts: routes by subject (`subjects`, `matching`, `operations`), the
shared request checks (`requests`), the state and photo path (`state`, `batcher`) and the HTTP
status of each error type (`errors`).

Requests are checked (bearer token, body size, pixel count), the photo is decoded and aligned in
a worker thread, hashed by the micro-batching queue (photos arriving within `batch_wait_ms` go
through the model in one call, on a thread of its own), and decided by the same `Gallery` methods
and threshold as gallery.py. Every gallery call runs on one database thread (an SQLite connection
belongs to one thread), except the token lookup, which reads on the event loop's own connection;
writes from other processes (gallery.py, `serve.py token`, other serve.py instances on the same
PostgreSQL gallery) are seen on the next request: each request first catches up with the
gallery's generation, and a rekey made elsewhere swaps this instance's model to the new key
(read from the key file). `identify` searches the instance's code index, loaded at start-up and
brought up to date from the gallery's change log before every search (on PostgreSQL also as soon
as a change commits: LISTEN/NOTIFY). A database that cannot be reached gives 503 until it is back.

What never leaves the process: the application key, tokens (only their SHA-256 is stored and a
presented token is only hashed), embeddings. Error bodies are one line, `{"detail": ...}`.
"""
import contextlib

from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from modules.deploy.service import matching, operations, subjects
from modules.deploy.service.errors import add_error_handlers
from modules.deploy.service.requests import BodyLimit
from modules.deploy.service.state import Service


def create_app(gallery, hasher, cfg, settings):
    """The FastAPI app serving the gallery of `gallery` (which it takes over and closes) with
    `hasher` (built under the gallery's key)."""
    service = Service(gallery, hasher, cfg, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.auth_gallery = service.gallery.reopen()  # on the event loop's thread
        service.batcher.start()
        service.start_index()
        try:
            yield
        finally:
            service.stop_index()
            await service.batcher.stop()
            await service.db(service.gallery.close)
            service.db_thread.shutdown(wait=True)
            service.auth_gallery.close()

    # FastAPIOffline: FastAPI whose /docs page serves Swagger UI from this server, not a CDN.
    app = FastAPIOffline(title='IoMFace verification service', lifespan=lifespan,
                         description='Protected-template (IoM hash) face verification. Send '
                         '`Authorization: Bearer <token>`; tokens come from `serve.py token add`.')
    app.state.service = service
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    add_error_handlers(app)
    for routes in (operations, subjects, matching):
        app.include_router(routes.router)
    app.mount('/static', StaticFiles(directory=operations.STATIC_DIR), name='static')
    return app
