"""One-line JSON errors: each gallery exception type has its HTTP status here, in one place."""
import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modules.deploy.attempts import Locked
from modules.deploy.gallery import KeyChanged, NotEnrolled, SubjectKeyMismatch, WrongKeyMode
from modules.deploy.service.requests import REKEYED
from modules.deploy.store import DatabaseUnavailable
from modules.utils import UserError

log = logging.getLogger('iomface.service')


def add_error_handlers(app):
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

    @app.exception_handler(Locked)
    async def locked(request, err):
        return JSONResponse({'detail': str(err)}, 429,
                            headers={'Retry-After': err.retry_after_header()})

    @app.exception_handler(WrongKeyMode)
    async def wrong_key_mode(request, err):
        return JSONResponse({'detail': str(err)}, 409)

    @app.exception_handler(SubjectKeyMismatch)
    async def other_subject_key(request, err):
        return JSONResponse({'detail': str(err)}, 409)

    @app.exception_handler(KeyChanged)
    async def rekeyed(request, err):
        return JSONResponse({'detail': REKEYED}, 409)

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
