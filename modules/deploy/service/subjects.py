"""Routes that change or list who is enrolled (admin tokens): enrol, list, revoke."""
from fastapi import APIRouter, HTTPException, UploadFile

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
                 subject_key: str | None = SUBJECT_KEY, service=SERVICE):
    """Enrol one photo of `name` (a new subject or one more template). In a subject-key gallery a
    new subject gets a fresh key, returned once as `subject_key` (hex) and never stored; another
    template of an enrolled subject needs that key (else 409)."""
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
        # made_under: checked inside the transaction against a rekey by another instance.
        gallery.enroll(name, code[None], [f'upload:{upload_name(image)}'], subject_key=key,
                       made_under=kid)
        return len(gallery.templates_of(name))
    templates = await service.fresh(write)
    body = {'name': name, 'templates': templates}
    if issued:
        body['subject_key'] = f'{key:x}'
    return with_crop(body, crop)


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
