"""Routes that compare a photo with the gallery (client tokens): 1:1 verify and 1:N identify."""
from fastapi import APIRouter, Form, HTTPException, UploadFile

from modules.deploy.decision import accepts
from modules.deploy.service.requests import (
    IMAGE,
    REKEYED,
    SERVICE,
    SUBJECT_KEY,
    WANT_CROP,
    client_auth,
    parse_subject_key,
    with_crop,
)

MAX_TOP_K = 100
router = APIRouter(dependencies=[client_auth])


@router.post('/v1/verify')
async def verify(name: str = Form(..., description='claimed subject'), image: UploadFile = IMAGE,
                 return_crop: bool = WANT_CROP, subject_key: str | None = SUBJECT_KEY,
                 service=SERVICE):
    """1:1 — is this photo `name`? The smallest Hamming distance to its templates. In a
    subject-key gallery the subject's key comes with the request; a wrong key never matches."""
    gallery, threshold = service.gallery, service.settings.threshold
    key = parse_subject_key(gallery, subject_key, required=True)
    code, kid, crop = await service.probe(image, return_crop, key)

    def decide():
        if kid != gallery.meta['key_id']:
            raise HTTPException(409, REKEYED)
        return gallery.verify(name, code), gallery.key_matches(name, key)
    distance, key_ok = await service.fresh(decide)
    body = {'name': name, 'distance': distance, 'm': gallery.m, 'threshold': threshold,
            'match': bool(key_ok and accepts(distance, threshold))}
    if gallery.subject_keys:
        body['key_matches'] = bool(key_ok)
    return with_crop(body, crop)


@router.post('/v1/identify')
async def identify(image: UploadFile = IMAGE,
                   top_k: int = Form(5, ge=1, le=MAX_TOP_K, description='candidates'),
                   return_crop: bool = WANT_CROP, service=SERVICE):
    """1:N — the top_k closest templates, best first, each with its decision (not in a
    subject-key gallery: 409)."""
    gallery, threshold = service.gallery, service.settings.threshold
    gallery.check_can_identify()
    code, kid, crop = await service.probe(image, return_crop)

    def search():
        if kid != gallery.meta['key_id']:
            raise HTTPException(409, REKEYED)
        return gallery.identify(code, top_k), gallery.indexed()
    found, templates = await service.fresh(search)
    return with_crop({'threshold': threshold, 'templates': templates, 'candidates': [
        {'name': n, 'distance': d, 'match': bool(accepts(d, threshold))}
        for n, d, _ in found]}, crop)
