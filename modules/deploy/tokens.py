"""Service access tokens (serve.py). A bearer token is 32 random bytes shown once when made; the
database keeps only its SHA-256 and a role, so a copy of the database gives no usable token."""
import hashlib
import hmac
import secrets
import time

from modules.utils import UserError

TOKEN_ROLES = ('admin', 'client')
_TOKEN_PREFIX = 'iomf_'


def token_digest(token):
    """Hex SHA-256 of a token: what the database stores."""
    return hashlib.sha256(token.encode('utf-8', 'surrogatepass')).hexdigest()


def token_id(digest):
    """Public id of a token (to list and revoke it): the first 12 hex digits of its digest."""
    return digest[:12]


def add_token(gallery, role):
    """Make a new random token with `role`, store its digest; return (token, token id)."""
    if role not in TOKEN_ROLES:
        raise UserError(f"token role must be one of {', '.join(TOKEN_ROLES)}, got {role!r}")
    token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
    digest = token_digest(token)
    gallery.add_token_row(digest, role, time.time())
    return token, token_id(digest)


def list_tokens(gallery):
    """[(token id, role, created)] of the live tokens, oldest first."""
    return [(token_id(digest), role, created) for digest, role, created in gallery.token_rows()]


def revoke_token(gallery, tid):
    """Delete the token whose id is `tid`; UserError when no token (or several) has that id."""
    tid = str(tid).strip().lower()
    found = [digest for digest, _, _ in gallery.token_rows() if token_id(digest) == tid]
    if len(found) != 1:
        raise UserError(f'no token with id {tid!r} in {gallery.db_path} (see `serve.py token '
                        'list`)')
    gallery.delete_token_row(found[0])


def token_role(gallery, token):
    """The role of a presented token, or None. The digest is compared with every stored one in
    constant time, so the answer time tells nothing about how close a guess came."""
    digest = token_digest(token)
    role = None
    for stored, stored_role, _ in gallery.token_rows():
        if hmac.compare_digest(stored, digest):
            role = stored_role
    return role
