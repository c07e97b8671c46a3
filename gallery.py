"""Protected-template gallery: init, enroll, enroll_dir, verify, identify, revoke, rekey, unlock,
list.

    gallery.py init --cfg_path CFG --db gallery.sqlite [--key_mode subject]
    gallery.py enroll --db gallery.sqlite --name NAME --image PHOTO [--key_out KEYFILE]
    gallery.py verify --db gallery.sqlite --name NAME --image PHOTO [--subject_key KEYFILE]
                                                                      (exit 0 match, 1 no match)
    gallery.py identify --db gallery.sqlite --image PHOTO [--top_k 5]  (exit 0 match, 1 no match)
    gallery.py unlock --db gallery.sqlite --name NAME   (clears a lockout after failed attempts)
    gallery.py enroll_dir | revoke | rekey | list ...
--db is an SQLite file or a PostgreSQL URL, postgresql://user@host:port/dbname (password from
~/.pgpass, PGPASSWORD or a service file, never in the URL); docs/deployment.md.
Errors exit with status 2 and one line on stderr.
"""
import contextlib
import datetime
import os
import sys

from absl import app, flags

from modules import script_flags
from modules.deploy import flags as gallery_flags
from modules.utils import UserError, cli_guard

COMMANDS = ('init', 'enroll', 'enroll_dir', 'verify', 'identify', 'revoke', 'rekey', 'unlock',
            'list')
script_flags.define(None, 'init: stage-2 config of the hashing model (later commands '
                    'use the one recorded in the database unless given)')
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
flags.DEFINE_string('name', None, 'subject name (enroll, verify, revoke, unlock)')
flags.DEFINE_string('image', None, 'face photo: a 112x112 aligned crop or a photograph (aligned '
                    'with modules.align, see --align)')
flags.DEFINE_string('input_dir', None, 'enroll_dir: one sub-folder of photos per subject')
flags.DEFINE_integer('top_k', 5, 'identify: number of closest templates to print', lower_bound=1)
gallery_flags.define_gallery_flags()
flags.adopt_module_key_flags(gallery_flags)  # listed by --help like the script's own
flags.DEFINE_enum('key_mode', 'application', ['application', 'subject'], 'init: one application '
                  'key file beside the database (1:1 and 1:N), or a key per subject that only the '
                  'subject holds (1:1 only)')
flags.DEFINE_string('key_out', None, 'enroll in a subject-key gallery: write the new subject key '
                    'here (mode 0600; give it to the subject, the gallery keeps only its id)')
flags.DEFINE_string('subject_key', None, 'verify (or add a template) in a subject-key gallery: '
                    "the subject's key file")
flags.DEFINE_bool('progress', True, 'enroll_dir: show a progress bar')
FLAGS = flags.FLAGS


def _require(command, *names):
    missing = [f'--{n}' for n in names if getattr(FLAGS, n) is None]
    if missing:
        raise UserError(f"{command} needs {', '.join(missing)}")


def _when(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')


def _subject_key(gallery, command):
    """The subject key of a subject-key gallery's enroll / verify (None for application keys)."""
    from modules.deploy.keys import read_key
    if not gallery.subject_keys:
        for name in ('key_out', 'subject_key'):
            if getattr(FLAGS, name) is not None:
                raise UserError(f'--{name} is for subject-key galleries; {FLAGS.db} uses its '
                                'application key')
        return None
    if command == 'verify' or FLAGS.subject_key is not None:
        _require(f'{command} in a subject-key gallery', 'subject_key')
        return read_key(FLAGS.subject_key)
    _require(f'{command} of a new subject in a subject-key gallery', 'key_out')
    if os.path.lexists(FLAGS.key_out):
        raise UserError(f'{FLAGS.key_out} already exists: a new subject key is never written over '
                        'a file')
    return None


def _threshold(cfg):
    from modules.deploy.decision import decision_threshold
    return decision_threshold(cfg, FLAGS.threshold, FLAGS.far)


def _enroll_one(gallery, hasher, key):
    """Enrol --image for --name; a new subject of a subject-key gallery gets a new key file."""
    from modules.deploy.keys import new_key, write_key
    fresh = gallery.subject_keys and key is None
    if fresh:
        key = new_key()
    code = hasher.photo_codes([FLAGS.image], FLAGS.align, key)
    if fresh:
        write_key(FLAGS.key_out, key)
    try:
        added = gallery.enroll(FLAGS.name, code, [FLAGS.image], subject_key=key)
    except BaseException:
        if fresh:
            os.remove(FLAGS.key_out)  # no key file for an enrolment that did not happen
        raise
    print(f'[*] enrolled {FLAGS.name} ({added} template, {gallery.count()} in the gallery)')
    if fresh:
        print(f'[*] subject key written to {FLAGS.key_out} (mode 0600): give it to {FLAGS.name}; '
              'the gallery keeps only its id, and verify needs it')


def _init():
    from modules.deploy.hashing import init_with_model
    _require('init', 'cfg_path')
    gallery, cfg = init_with_model(FLAGS.db, FLAGS.cfg_path, FLAGS.key_mode, FLAGS.key_file)
    with contextlib.closing(gallery):
        where = (f"key file {gallery.key_file} (mode 0600, key id {gallery.meta['key_id']})"
                 if FLAGS.key_mode == 'application' else
                 'no key: every subject gets its own key file at enrolment (--key_out)')
        print(f"[*] created {FLAGS.db} (m={cfg['m']}, q={cfg['q']}, model "
              f"{gallery.meta['model_fp'][:16]}) and {where}")


def _enroll_or_verify(command):
    from modules.deploy.decision import accepts
    from modules.deploy.gallery import Gallery
    from modules.deploy.hashing import open_with_model
    _require(command, 'name', 'image')
    with contextlib.closing(Gallery.open(FLAGS.db, FLAGS.key_file)) as gallery:
        key = _subject_key(gallery, command)  # before the model is loaded
    gallery, hasher, cfg = open_with_model(FLAGS.db, FLAGS.cfg_path,
                                           FLAGS.name if command == 'verify' else None,
                                           FLAGS.key_file)
    with contextlib.closing(gallery):
        if command == 'enroll':
            return _enroll_one(gallery, hasher, key)
        threshold, source = _threshold(cfg)
        code = hasher.photo_codes([FLAGS.image], FLAGS.align, key)
        distance = gallery.verify(FLAGS.name, code)
        # A wrong subject key never matches, whatever the distance of its code.
        key_ok = gallery.key_matches(FLAGS.name, key)
        match = key_ok and accepts(distance, threshold)
        note = '' if key_ok else f' (the key is not the one {FLAGS.name} was enrolled with)'
        print(f"{FLAGS.name}: distance {distance} / {gallery.m}, threshold {threshold:g} "
              f"({source}): {'MATCH' if match else 'NO MATCH'}{note}")
    sys.exit(0 if match else 1)


def _enroll_dir():
    from modules.align import load_face
    from modules.deploy.hashing import enroll_folders, identity_folders, open_with_model
    _require('enroll_dir', 'input_dir')
    folders = identity_folders(FLAGS.input_dir)
    gallery, hasher, cfg = open_with_model(FLAGS.db, FLAGS.cfg_path, key_file=FLAGS.key_file)
    with contextlib.closing(gallery):
        summary = enroll_folders(gallery, folders, hasher.codes,
                                 lambda p: load_face(p, cfg['input_size'], FLAGS.align),
                                 progress=FLAGS.progress)
    print(f"[*] {len(folders)} subjects: {summary['enrolled']} enrolled "
          f"({summary['templates']} templates), {summary['skipped']} already enrolled, "
          f"{len(summary['empty'])} without a usable photo; {len(summary['failed'])} photos "
          'failed')
    for path, reason in summary['failed']:
        print(f'    failed: {path}: {reason}')
    for name in summary['empty']:
        print(f'    not enrolled: {name} (no usable photo)')


def _identify():
    from modules.deploy.decision import accepts
    from modules.deploy.gallery import Gallery
    from modules.deploy.hashing import open_with_model
    _require('identify', 'image')
    with contextlib.closing(Gallery.open(FLAGS.db, FLAGS.key_file)) as gallery:
        gallery.check_can_identify()  # before the model is loaded
    gallery, hasher, cfg = open_with_model(FLAGS.db, FLAGS.cfg_path, key_file=FLAGS.key_file)
    with contextlib.closing(gallery):
        threshold, source = _threshold(cfg)
        found = gallery.identify(hasher.photo_codes([FLAGS.image], FLAGS.align), FLAGS.top_k)
        print(f'threshold {threshold:g} ({source}); {gallery.count()} templates')
        for rank, (name, distance, _) in enumerate(found, 1):
            mark = 'MATCH' if accepts(distance, threshold) else ''
            print(f'{rank:3d}. {name:30s} distance {distance:4d} / {gallery.m} {mark}')
    sys.exit(0 if accepts(found[0][1], threshold) else 1)


def _revoke(gallery):
    _require('revoke', 'name')
    deleted = gallery.revoke(FLAGS.name)
    print(f'[*] revoked {FLAGS.name}: {deleted} template(s) deleted')


def _rekey(gallery):
    if not gallery.subject_keys:
        from modules.config import STAGE2_REQUIRED, load_config
        from modules.deploy.hashing import check_key_change
        check_key_change(load_config(FLAGS.cfg_path or gallery.meta['cfg_path'], STAGE2_REQUIRED))
    old = gallery.meta['key_id']
    deleted = gallery.rekey()
    print(f"[*] new key {gallery.meta['key_id']} (was {old}) in {gallery.key_file}; {deleted} "
          'template(s) deleted: every subject must enrol again')


def _unlock(gallery):
    from modules.deploy.attempts import unlock
    _require('unlock', 'name')
    cleared = unlock(gallery, FLAGS.name, 'gallery.py unlock')
    print(f'[*] unlocked {FLAGS.name}: {cleared} failed attempt(s) in a row cleared')


def _list(gallery):
    print(f"{FLAGS.db}: m={gallery.m} q={gallery.q}, {gallery.meta['key_mode']} key(s), key id "
          f"{gallery.meta['key_id']}, model "
          f"{gallery.meta['model_fp'][:16]}, {gallery.count()} templates")
    for name, count, first, last in gallery.subjects():
        print(f'  {name:30s} {count:3d} template(s), enrolled {_when(first)}'
              + (f', last {_when(last)}' if last != first else ''))
    from modules.deploy.attempts import lockouts
    for scope, name, failures, until in lockouts(gallery):
        print(f"  locked until {_when(until)}: {'' if scope == 'subject' else 'token '}{name} "
              f'({failures} failures in a row)')
    print('audit:')
    for ts, event, name, detail in gallery.audit()[-20:]:
        print(f"  {_when(ts)} {event:7s} {name or '-':20s} {detail}")


# Commands that need the hashing model, and those that only open the database.
_WITH_MODEL = {'init': _init, 'enroll': lambda: _enroll_or_verify('enroll'),
               'verify': lambda: _enroll_or_verify('verify'), 'enroll_dir': _enroll_dir,
               'identify': _identify}
_DATABASE_ONLY = {'revoke': _revoke, 'rekey': _rekey, 'unlock': _unlock, 'list': _list}


@cli_guard
def main(argv):
    """Dispatch the sub-command."""
    from modules.deploy.gallery import Gallery
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise UserError(f"give one sub-command: {', '.join(COMMANDS)} (got {' '.join(argv[1:])!r})")
    command = argv[1]
    _require(command, 'db')
    if command in _WITH_MODEL:
        return _WITH_MODEL[command]()
    with contextlib.closing(Gallery.open(FLAGS.db, FLAGS.key_file)) as gallery:
        _DATABASE_ONLY[command](gallery)


if __name__ == '__main__':
    app.run(main)
