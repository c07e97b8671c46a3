"""Application and subject keys: key files (mode 0600), key ids, and the hand-over of a new key.

A key is a 128-bit non-negative integer, the seed of the IoM model's PermLayer permutation. The
database only ever holds a key's id (a truncated hash); the key itself lives in a file beside the
database (application keys) or with the subject (subject keys). A rekey writes the new key to
`<key>.new`, commits the database, then renames the file; `matching_key` finishes that hand-over
when a process stopped between the last two steps.
"""
import contextlib
import hashlib
import os
import secrets
import stat

from modules.utils import UserError, atomic_output

KEY_SUFFIX = '.key'
PENDING_SUFFIX = '.new'
SUBJECT_KEY_ID = 'per-subject'  # meta key_id of a subject-key gallery
KEY_BITS = 128


def new_key():
    """A fresh random application key (a 128-bit non-negative integer, the PermLayer seed)."""
    return secrets.randbits(KEY_BITS)


def key_id(key):
    """Public id of a key: the first 16 hex digits of its SHA-256 (the key cannot be recovered)."""
    return hashlib.sha256(f'iomface-key:{key:x}'.encode()).hexdigest()[:16]


def write_key(path, key):
    """Write a key file with mode 0600 from the start (never world-readable, not even briefly)."""
    with atomic_output(path, 'w', permissions=0o600) as fh:
        fh.write(f'{key:x}\n')


def read_key(path):
    """Read a key file; UserError when it is missing, readable by group/others, or malformed."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f'{path}: key file not found (it is created by `gallery.py init` beside '
                        'the database)') from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f'{path}: key file is accessible by other users (mode '
                        f'{stat.S_IMODE(mode):04o}); run `chmod 600 {path}`')
    with open(path, encoding='ascii', errors='replace') as fh:
        text = fh.read().strip()
    try:
        key = int(text, 16)
    except ValueError:
        raise UserError(f'{path}: not a gallery key file (expected one hexadecimal number)') from None
    if key < 0:
        raise UserError(f'{path}: not a gallery key file (negative key)')
    return key


def finish_rekey(pending, kpath, new):
    """Move the new key file into place; another process that opened the gallery after the
    commit may have moved it already."""
    try:
        os.replace(pending, kpath)
    except FileNotFoundError:
        if read_key(kpath) != new:
            raise UserError(f'{kpath}: the new key file {pending} vanished during rekey') from None


def matching_key(db_path, kpath, expected_id):
    """The key in `kpath` when its id is `expected_id`, finishing an interrupted rekey; else
    UserError."""
    pending = kpath + PENDING_SUFFIX
    key = read_key(kpath)
    if key_id(key) == expected_id:
        return key
    # A rekey writes the new key to <key>.new, commits the database, then renames the file:
    # finish a rekey that was interrupted between the last two steps.
    if os.path.isfile(pending):
        with contextlib.suppress(UserError):  # another process may move it meanwhile
            new = read_key(pending)
            if key_id(new) == expected_id:
                finish_rekey(pending, kpath, new)
                return new
    key = read_key(kpath)  # a rekey in another process may have just moved it into place
    if key_id(key) == expected_id:
        return key
    raise UserError(f'{kpath}: key id {key_id(key)} is not the key of {db_path} (key id '
                    f'{expected_id}); use the key file made with this database')
