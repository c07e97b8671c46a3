"""Routes about the service itself: liveness, re-keying (admin) and the browser page."""
import os

from fastapi import APIRouter
from fastapi.responses import FileResponse

from modules.deploy.service.requests import SERVICE, admin_auth

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
# The page may load only what this server serves (and show what the camera or a picked file
# gives): a browser fetches nothing from elsewhere, whatever the page's script tries.
_PAGE_HEADERS = {'Content-Security-Policy': "default-src 'self'; img-src 'self' data: blob:; "
                 "media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                 "frame-ancestors 'none'", 'Cache-Control': 'no-store'}

router = APIRouter()


@router.get('/healthz')
async def healthz(service=SERVICE):
    """Liveness and what is served: template count, code size, model and key ids, threshold,
    whether answers hold distances, the attempt limits, photos hashed and model calls so far
    (their ratio is the mean batch size)."""
    gallery, settings = service.gallery, service.settings
    count = await service.db(gallery.count)
    return {'status': 'ok', 'templates': count, 'm': gallery.m, 'q': gallery.q,
            'model_fingerprint': gallery.meta['model_fp'], 'key_id': gallery.meta['key_id'],
            'threshold': settings.threshold, 'expose_scores': settings.expose_scores,
            'limits': settings.limits(), 'photos_hashed': service.batcher.hashed,
            'model_calls': service.batcher.batches}


@router.post('/v1/rekey', dependencies=[admin_auth])
async def rekey(service=SERVICE):
    """New application key: every template is deleted, every subject must enrol again (not in a
    subject-key gallery: 409)."""
    gallery = service.gallery
    gallery.check_can_rekey()
    old = gallery.meta['key_id']
    deleted = await service.fresh(gallery.rekey)
    await service.batcher.run_on_model_thread(service.swap_hasher, gallery.key,
                                              gallery.meta['key_id'])
    return {'old_key_id': old, 'key_id': gallery.meta['key_id'], 'deleted': deleted}


@router.get('/', include_in_schema=False)
async def page():
    """The browser page (static files, no build step)."""
    return FileResponse(os.path.join(STATIC_DIR, 'index.html'), headers=_PAGE_HEADERS)
