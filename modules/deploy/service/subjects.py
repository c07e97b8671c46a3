"""Routes that change or list who is enrolled (admin tokens): enrol, list, revoke, unlock."""
from fastapi import APIRouter, HTTPException, UploadFile

from modules.deploy.attempts import unlock
from modules.deploy.decision import accepts
from modules.deploy.gallery import NotEnrolled
from modules.deploy.keys import new_key
from modules.deploy.service.requests import (
    IMAGE,
    REKEYED,
    SERVICE,
    SUBJECT_KEY,
    WANT_CROP,
    admin_auth,
    checked_name,
    parse_subject_key,
    with_crop,
)
from modules.deploy.service.state import upload_name

router = APIRouter(dependencies=[admin_auth])


@router.post('/v1/subjects/{name}/templates', status_code=201)
async def enroll(name: str, image: UploadFile = IMAGE, return_crop: bool = WANT_CROP,
                 subject_key: str | None = SUBJECT_KEY, caller=admin_auth, service=SERVICE):
    """Enrol one photo of `name` (a new subject or one more template). A further template must
    match the subject's templates (else 409), and counts against the subject's attempt limits
    like a verify (429 while it is locked out). In a subject-key gallery a new subject gets a
    fresh key, returned once as `subject_key` (hex) and never stored; another template of an
    enrolled subject needs that key (else 409)."""
    gallery = service.gallery
    checked_name(name)
    key = parse_subject_key(gallery, subject_key, required=False)
    issued = gallery.subject_keys and key is None
    if issued:
        key = new_key()
    code, kid, crop = await service.probe(image, return_crop, key)

    def write():
        if kid != gallery.meta['key_id']:
            raise HTTPException(409, REKEYED)
        _check_further_template(service, name, code, key, caller)
        # made_under: checked inside the transaction against a rekey by another instance.
        gallery.enroll(name, code[None], [f'upload:{upload_name(image)}'], subject_key=key,
                       made_under=kid)
        return len(gallery.templates_of(name))
    templates = await service.fresh(write)
    body = {'name': name, 'templates': templates}
    if issued:
        body['subject_key'] = f'{key:x}'
    return with_crop(body, crop)


def _check_further_template(service, name, code, key, caller):
    """On the database thread: a photo offered as one more template of an enrolled subject is
    an attempt on that subject: it must match (else 409), and the attempt is counted."""
    gallery = service.gallery
    try:
        distance = gallery.verify(name, code)
    except NotEnrolled:
        return  # a new subject
    key_ok = gallery.key_matches(name, key)
    match = key_ok and accepts(distance, service.settings.threshold)
    service.settle('subject', name, match, f'further template by token {caller.token_id}')
    if key_ok and not match:  # a wrong subject key: gallery.enroll refuses it with its reason
        raise HTTPException(409, f'this photo does not match the templates of {name!r}: a '
                            'further template must show the same person (to replace them, '
                            'revoke the subject and enrol it again)')


@router.get('/v1/subjects')
async def subjects(service=SERVICE):
    """Every enrolled subject with its number of templates and enrolment times (UNIX s)."""
    rows = await service.db(service.gallery.subjects)
    return {'subjects': [{'name': n, 'templates': c, 'first_enrolled': f, 'last_enrolled': last}
                         for n, c, f, last in rows]}


@router.delete('/v1/subjects/{name}')
async def revoke(name: str, service=SERVICE):
    """Delete every template of `name` (404 when not enrolled)."""
    return {'name': name, 'deleted': await service.db(service.gallery.revoke, name)}


@router.delete('/v1/subjects/{name}/lockout')
async def unlock_subject(name: str, caller=admin_auth, service=SERVICE):
    """Clear the failed attempts and any lockout of `name` (an audit row names the token); 404
    when not enrolled."""
    cleared = await service.db(unlock, service.gallery, name, f'token {caller.token_id}')
    return {'name': name, 'failures_cleared': cleared}
