"""What every route shares: the service behind the app, bearer-token roles and the per-token
request bucket, the upload size limit, form fields and the subject-key field."""
import dataclasses
import math

from fastapi import Depends, File, Form, HTTPException, Request
from fastapi.responses import JSONResponse

from modules.deploy.gallery import check_name
from modules.deploy.tokens import token_digest, token_id, token_role
from modules.utils import UserError

REKEYED = 'the gallery was re-keyed while this request was processed: send it again'


def current_service(request: Request):
    """The `Service` of the app that received the request."""
    return request.app.state.service


SERVICE = Depends(current_service)


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


def _bearer(request):
    header = request.headers.get('authorization', '')
    scheme, _, token = header.partition(' ')
    if scheme.lower() != 'bearer' or not token.strip():
        raise HTTPException(401, 'missing bearer token: send the header "Authorization: Bearer '
                            '<token>" (tokens are made with `serve.py token add`)',
                            {'WWW-Authenticate': 'Bearer'})
    return token.strip()


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who sent a request: the token's role and public id (never the token)."""

    role: str
    token_id: str


def _role_checker(required):
    async def check(request: Request):
        service = current_service(request)
        token = _bearer(request)
        # A lookup of a few rows on the event loop's own connection (WAL: readers never wait
        # for writers) costs less than a hop to the database thread, and sees revocations at once.
        role = token_role(service.auth_gallery, token)
        if role is None:
            raise HTTPException(401, 'invalid or revoked token', {'WWW-Authenticate': 'Bearer'})
        digest = token_digest(token)
        # Only known tokens get a bucket: made-up tokens cannot fill the table.
        wait = service.bucket.take(digest) if service.bucket is not None else 0.0
        if wait:
            settings = service.settings
            raise HTTPException(429, f'too many requests from this token (--rate {settings.rate:g} '
                                f'per second, --burst {settings.burst}): try again in '
                                f'{math.ceil(wait)} s', {'Retry-After': str(math.ceil(wait))})
        if required == 'admin' and role != 'admin':
            raise HTTPException(403, 'this needs an admin token')
        return Caller(role, token_id(digest))
    return check


client_auth = Depends(_role_checker('client'))
admin_auth = Depends(_role_checker('admin'))
IMAGE = File(..., description='face photo (aligned on the fly unless it is an input_size crop)')
WANT_CROP = Form(False, description='also return the aligned crop as a PNG data URL')
SUBJECT_KEY = Form(None, description="subject-key galleries only: the subject's key (hex), as "
                   'issued at enrolment; never stored or logged')


def parse_subject_key(gallery, text, required):
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


def checked_name(name):
    """`name` when it is a valid subject name, else 422."""
    try:
        return check_name(name)
    except UserError as err:
        raise HTTPException(422, str(err)) from None


def with_crop(body, crop):
    """The answer body, with the aligned crop when the client asked for it."""
    if crop is not None:
        body['crop'] = crop
    return body
