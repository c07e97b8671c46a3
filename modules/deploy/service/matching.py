"""Routes that compare a photo with the gallery (client tokens): 1:1 verify and 1:N identify.

They answer the decision and nothing more (a distance is what a hill-climbing attacker needs),
unless serve.py runs with --expose_scores; each decision is counted against the attempt limits
(modules.deploy.attempts) before it is given."""
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
                 caller=client_auth, service=SERVICE):
    """1:1 — is this photo `name`? The decision only (with --expose_scores also the smallest
    Hamming distance to its templates). Consecutive failures for one subject lock it out (429).
    In a subject-key gallery the subject's key comes with the request; a wrong key never
    matches."""
    gallery, settings = service.gallery, service.settings
    key = parse_subject_key(gallery, subject_key, required=True)
    await service.refuse_if_locked('subject', name)
    code, kid, crop = await service.probe(image, return_crop, key)

    def decide():
        if kid != gallery.meta['key_id']:
            raise HTTPException(409, REKEYED)
        distance, key_ok = gallery.verify(name, code), gallery.key_matches(name, key)
        match = bool(key_ok and accepts(distance, settings.threshold))
        service.settle('subject', name, match, f'verify by token {caller.token_id}')
        return distance, key_ok, match
    distance, key_ok, match = await service.fresh(decide)
    if not settings.expose_scores:
        return with_crop({'name': name, 'match': match}, crop)
    body = {'name': name, 'distance': distance, 'm': gallery.m, 'threshold': settings.threshold,
            'match': match}
    if gallery.subject_keys:
        body['key_matches'] = bool(key_ok)
    return with_crop(body, crop)


@router.post('/v1/identify')
async def identify(image: UploadFile = IMAGE,
                   top_k: int = Form(5, ge=1, le=MAX_TOP_K, description='candidates'),
                   return_crop: bool = WANT_CROP, caller=client_auth, service=SERVICE):
    """1:N — the subjects that match, best first (at most top_k; with --expose_scores the top_k
    closest templates with their distances and decisions). Consecutive probes of one token that
    match no one lock its identify out (429). Not in a subject-key gallery: 409."""
    gallery, settings = service.gallery, service.settings
    gallery.check_can_identify()
    await service.refuse_if_locked('token', caller.token_id)
    code, kid, crop = await service.probe(image, return_crop)

    def search():
        if kid != gallery.meta['key_id']:
            raise HTTPException(409, REKEYED)
        found = [(n, d, bool(accepts(d, settings.threshold)))
                 for n, d, _ in gallery.identify(code, top_k)]
        service.settle('token', caller.token_id, any(m for *_, m in found), 'identify by token '
                       + caller.token_id)
        return found, gallery.indexed() if settings.expose_scores else None
    found, templates = await service.fresh(search)
    if not settings.expose_scores:
        return with_crop({'candidates': [{'name': n} for n, _, m in found if m]}, crop)
    return with_crop({'threshold': settings.threshold, 'templates': templates, 'candidates': [
        {'name': n, 'distance': d, 'match': m} for n, d, m in found]}, crop)
