"""Verification service over a protected-template gallery (docs/service.md).

    serve.py --cfg_path CFG --db gallery.sqlite [--host 127.0.0.1] [--port 8000]
    serve.py token add --role admin|client --db gallery.sqlite   (prints the new token once)
    serve.py token list | revoke --id ID --db gallery.sqlite
The gallery is created (as `gallery.py init` does) when --db does not exist yet. --db is an SQLite
file or postgresql://user@host:port/dbname (several instances may share one PostgreSQL gallery;
docs/deployment.md). SIGTERM or
Ctrl-C: requests in flight are finished, then the server exits 0.
Errors exit with status 2 and one line on stderr.
"""
import signal
import sys

from absl import app, flags

from modules import script_flags
from modules.deploy import attempts
from modules.deploy import flags as gallery_flags
from modules.deploy.service import bucket
from modules.utils import UserError, cli_guard

script_flags.define(None, 'stage-2 config of the hashing model (default: the one '
                    'recorded in the gallery; needed to create a new gallery)')
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
flags.DEFINE_string('host', '127.0.0.1', 'address to bind (loopback: put a TLS proxy in front '
                    'for other machines, see docs/service.md)')
flags.DEFINE_integer('port', 8000, 'TCP port', lower_bound=0, upper_bound=65535)
flags.DEFINE_float('max_upload_mb', 10.0, 'largest request body (413 above it)', lower_bound=0.01)
flags.DEFINE_integer('max_pixels', 40_000_000, 'largest image in pixels (413 above it: '
                     'decompression bombs)', lower_bound=1)
gallery_flags.define_gallery_flags()
flags.adopt_module_key_flags(gallery_flags)  # listed by --help like the script's own
flags.DEFINE_integer('max_batch', 64, 'most photos hashed in one model call', lower_bound=1)
flags.DEFINE_float('batch_wait_ms', 30.0, 'longest wait of a batch for more photos (only while '
                   'fewer than recently waited at once are in it)', lower_bound=0.0)
flags.DEFINE_bool('expose_scores', False, 'answer verify and identify with Hamming distances '
                  '(research, benchmarks); they are what a hill-climbing attacker needs, so by '
                  'default the answers hold decisions only')
flags.DEFINE_integer('max_failures', attempts.MAX_FAILURES, 'consecutive non-matches for one '
                     'subject (verify, a further template) before it is locked out (429); 0: no '
                     'limit', lower_bound=0)
flags.DEFINE_float('lockout_s', attempts.LOCKOUT_S, 'first lockout in seconds; each further '
                   'failure doubles it', lower_bound=1.0)
flags.DEFINE_float('max_lockout_s', attempts.MAX_LOCKOUT_S, 'longest lockout in seconds',
                   lower_bound=1.0)
flags.DEFINE_integer('max_identify_failures', attempts.MAX_IDENTIFY_FAILURES, 'consecutive '
                     'identify probes of one token that match no one before its identify is '
                     'locked out (same delays); 0: no limit', lower_bound=0)
flags.DEFINE_float('rate', bucket.RATE, 'requests per second per token on /v1 routes once a '
                   'burst is spent (429 above it; per instance); 0: no bucket', lower_bound=0.0)
flags.DEFINE_integer('burst', bucket.BURST, 'requests a token may send at once', lower_bound=1)
flags.DEFINE_enum('role', None, ('admin', 'client'), 'token add: what the token may do (admin: '
                  'enrol, list, revoke, rekey; client: verify, identify)')
flags.DEFINE_string('id', None, 'token revoke: the id printed by `token add` / `token list`')
flags.DEFINE_enum('key_mode', 'application', ('application', 'subject'), 'a new gallery: one '
                  'application key (verify and identify) or a key per subject, returned once at '
                  'enrolment and sent with each verify (verify only)')
flags.DEFINE_enum('log_level', 'info', ('debug', 'info', 'warning', 'error'), 'server log level')
FLAGS = flags.FLAGS


def _token(argv):
    import datetime

    from modules.deploy.gallery import Gallery
    from modules.deploy.tokens import add_token, list_tokens, revoke_token
    if len(argv) != 3 or argv[2] not in ('add', 'list', 'revoke'):
        raise UserError('give one token command: add, list, revoke')
    if FLAGS.db is None:
        raise UserError(f'token {argv[2]} needs --db')
    gallery = Gallery.open(FLAGS.db, FLAGS.key_file)
    if argv[2] == 'add':
        if FLAGS.role is None:
            raise UserError('token add needs --role admin or --role client')
        token, tid = add_token(gallery, FLAGS.role)
        # The token alone on stdout (TOKEN=$(serve.py token add ...)); it is not stored.
        print(f'[*] new {FLAGS.role} token, id {tid}; it is shown only now, keep it secret:',
              file=sys.stderr)
        print(token)
    elif argv[2] == 'revoke':
        if FLAGS.id is None:
            raise UserError('token revoke needs --id (see `serve.py token list`)')
        revoke_token(gallery, FLAGS.id)
        print(f'[*] revoked token {FLAGS.id}')
    else:
        for tid, role, created in list_tokens(gallery):
            when = datetime.datetime.fromtimestamp(created, datetime.UTC)
            print(f'{tid}  {role:6s}  made {when:%Y-%m-%d %H:%M:%S} UTC')


def _limit_settings():
    """The Settings fields of the answer and attempt-limit flags (UserError for bad ones)."""
    from modules.deploy.attempts import Limits
    subject = Limits(FLAGS.max_failures, FLAGS.lockout_s, FLAGS.max_lockout_s)
    return dict(expose_scores=FLAGS.expose_scores, subject_limits=subject,
                identify_limits=Limits(FLAGS.max_identify_failures, FLAGS.lockout_s,
                                       FLAGS.max_lockout_s),
                rate=FLAGS.rate, burst=FLAGS.burst)


def _limits_line(settings):
    """What serve.py prints at start about answers and limits."""
    s, i = settings.subject_limits, settings.identify_limits
    lockout = f'then {s.lockout_s:g} s doubling up to {s.max_lockout_s:g} s'
    return ('[*] answers: ' + ('decisions and DISTANCES (--expose_scores: for research only)'
                               if settings.expose_scores else 'decisions only') + '; limits: '
            + (f'{s.max_failures} failures per subject' if s.on else 'none per subject') + ', '
            + (f'{i.max_failures} identify probes without a match per token' if i.on else
               'none on identify probes') + (f' ({lockout})' if s.on or i.on else '') + ', '
            + (f'{settings.rate:g} requests/s per token after a burst of {settings.burst}'
               if settings.rate else 'no per-token rate'))


def _serve():
    import uvicorn

    from modules.deploy.decision import decision_threshold
    from modules.deploy.gallery import gallery_exists
    from modules.deploy.hashing import init_with_model, open_with_model
    from modules.deploy.service.app import create_app
    from modules.deploy.service.state import Settings
    if FLAGS.db is None:
        raise UserError('serve.py needs --db (a gallery database, created when missing)')
    if not gallery_exists(FLAGS.db):
        if FLAGS.cfg_path is None:
            raise UserError(f'{FLAGS.db} does not exist: give --cfg_path to create it')
        gallery, _ = init_with_model(FLAGS.db, FLAGS.cfg_path, FLAGS.key_mode,
                                     key_file=FLAGS.key_file)
        print(f'[*] created {FLAGS.db} ' + (
            f"and key file {gallery.key_file} (key id {gallery.meta['key_id']})"
            if not gallery.subject_keys else '(subject keys: no key file)'))
        gallery.close()
    gallery, hasher, cfg = open_with_model(FLAGS.db, FLAGS.cfg_path, key_file=FLAGS.key_file)
    threshold, source = decision_threshold(cfg, FLAGS.threshold, FLAGS.far)
    settings = Settings(threshold=threshold, threshold_source=source,
                        max_upload_bytes=int(FLAGS.max_upload_mb * 2 ** 20),
                        max_pixels=FLAGS.max_pixels, align=FLAGS.align,
                        max_batch=FLAGS.max_batch, batch_wait_s=FLAGS.batch_wait_ms / 1000,
                        **_limit_settings())
    print(f'[*] {FLAGS.db}: {gallery.count()} templates, m={gallery.m} q={gallery.q}, '
          f"{gallery.meta['key_mode']} key(s), key id {gallery.meta['key_id']}; threshold "
          f'{threshold:g} ({source})')
    print(_limits_line(settings))
    print(f'[*] serving on http://{FLAGS.host}:{FLAGS.port}/ (API docs at /docs)', flush=True)
    # uvicorn finishes the requests in flight on SIGTERM/SIGINT and then raises the signal again
    # with the handler it found: this one makes that clean stop (or one before uvicorn runs) an
    # exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    uvicorn.run(create_app(gallery, hasher, cfg, settings), host=FLAGS.host, port=FLAGS.port,
                log_level=FLAGS.log_level, timeout_graceful_shutdown=30,
                limit_concurrency=1000, server_header=False)


@cli_guard
def main(argv):
    """Serve, or manage tokens."""
    if len(argv) >= 2 and argv[1] == 'token':
        _token(argv)
    elif len(argv) == 1:
        _serve()
    else:
        raise UserError(f"unknown command {' '.join(argv[1:])!r}: serve.py [flags] or serve.py "
                        'token add|list|revoke')


if __name__ == '__main__':
    app.run(main)
