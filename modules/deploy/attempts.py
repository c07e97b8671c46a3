"""Attempt limits kept with the gallery: consecutive failed attempts per subject (verify, a
further template) and per token (identify probes), and the lockout that follows them.

After `max_failures` consecutive failures a subject (or a token's identify probes) is locked for
`lockout_s`; every further failure, once a lockout has ended, doubles the delay, up to
`max_lockout_s`; a match resets the count (NIST SP 800-63B 5.2.3: at most 5 failed biometric
attempts in a row, then a delay of at least 30 s that grows exponentially).

The counters live in the gallery database (table `attempts`), so every service instance on the
gallery and every restart sees the same ones; every failure, lockout and unlock is an audit row.
A decision and its record are one transaction that locks the counter row first (SQLite: the
write lock of BEGIN IMMEDIATE; PostgreSQL: SELECT ... FOR UPDATE), so concurrent attempts on one
subject are counted one after another and a burst of them cannot slip past the limit together.
These writes leave the gallery's generation alone: nobody's cached codes are reloaded because an
attempt failed.
"""
import dataclasses
import math
import time

from modules.deploy.gallery import NotEnrolled
from modules.utils import UserError

SCOPES = ('subject', 'token')
# serve.py's defaults: NIST's 5 failures and 30 s; identify probes a whole gallery at once, where
# a kiosk meets unknown faces, hence more room per token.
MAX_FAILURES = 5
LOCKOUT_S = 30.0
MAX_LOCKOUT_S = 3600.0
MAX_IDENTIFY_FAILURES = 20
_AUDIT = 'INSERT INTO audit (time, event, name, detail) VALUES (?, ?, ?, ?)'
_ROW = 'SELECT failures, locked_until FROM attempts WHERE scope = ? AND name = ?'
_SET = 'UPDATE attempts SET failures = ?, locked_until = ? WHERE scope = ? AND name = ?'
# 2 ** 64 times any lockout is past every cap: the exponent stops growing there (no overflow).
_MAX_DOUBLINGS = 64


class Locked(UserError):
    """Attempts refused until a lockout ends (the service answers 429 with Retry-After)."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after

    def retry_after_header(self):
        """Whole seconds to wait, at least 1 (the Retry-After header)."""
        return str(max(1, math.ceil(self.retry_after)))


@dataclasses.dataclass(frozen=True)
class Limits:
    """How many consecutive failures lock, and for how long; max_failures 0: no limit."""

    max_failures: int = MAX_FAILURES
    lockout_s: float = LOCKOUT_S
    max_lockout_s: float = MAX_LOCKOUT_S

    def __post_init__(self):
        if self.max_failures < 0 or self.lockout_s <= 0 or self.max_lockout_s < self.lockout_s:
            raise UserError(f'attempt limits: need max_failures >= 0 (got {self.max_failures}), '
                            f'lockout_s > 0 (got {self.lockout_s:g}) and max_lockout_s >= '
                            f'lockout_s (got {self.max_lockout_s:g})')

    @property
    def on(self):
        """True when failures are counted at all."""
        return self.max_failures > 0

    def delay(self, failures):
        """Seconds locked after `failures` consecutive failures (0 below the limit)."""
        if not self.on or failures < self.max_failures:
            return 0.0
        doublings = min(failures - self.max_failures, _MAX_DOUBLINGS)
        return min(self.max_lockout_s, self.lockout_s * 2.0 ** doublings)


def _refusal(scope, name, failures, until, now):
    what = (f'too many failed attempts for {name!r} ({failures} in a row)' if scope == 'subject'
            else f'too many identify probes without a match from this token ({failures} in a row)')
    wait = until - now
    return Locked(f'{what}: try again in {math.ceil(wait)} s', wait)


def check(gallery, scope, name, now=None):
    """Raise Locked when `name` (a subject, or a token id) is locked out now: a plain read, the
    cheap refusal before a photo is hashed (`settle` decides for good)."""
    now = time.time() if now is None else now
    rows = gallery.store.read(_ROW, (scope, name))
    if rows and rows[0][1] > now:
        raise _refusal(scope, name, rows[0][0], rows[0][1], now)


def settle(gallery, scope, name, matched, limits, what, now=None):
    """Record one decided attempt and say whether its answer may be given: Locked (nothing
    recorded) while `name` is locked out; else a match resets the count and a failure adds one
    (with its audit row, and a lockout row when it locks). Returns the consecutive failures."""
    now = time.time() if now is None else now
    with gallery.store.write(bump=False) as conn:
        # The row exists before it is locked: two first failures then queue on it like any others.
        conn.execute('INSERT INTO attempts (scope, name, failures, locked_until) '
                     'VALUES (?, ?, 0, 0) ON CONFLICT DO NOTHING', (scope, name))
        failures, until = conn.execute(_ROW + gallery.store.row_lock, (scope, name)).fetchone()
        if until > now:
            raise _refusal(scope, name, failures, until, now)
        if matched:
            if failures:
                conn.execute(_SET, (0, 0.0, scope, name))
            return 0
        failures += 1
        delay = limits.delay(failures)
        conn.execute(_SET, (failures, now + delay if delay else 0.0, scope, name))
        subject = name if scope == 'subject' else None
        conn.execute(_AUDIT, (now, 'failure', subject, f'{what}: no match ({failures} in a row)'))
        if delay:
            conn.execute(_AUDIT, (now, 'lockout', subject,
                                  f'{_who(scope, name)} locked for {delay:g} s after {failures} '
                                  'failures in a row'))
    return failures


def _who(scope, name):
    return 'subject' if scope == 'subject' else f'identify by token {name}'


def unlock(gallery, name, by, now=None):
    """Clear a subject's failures and lockout (an `unlock` audit row naming `by`); NotEnrolled
    for a name with no template and no count. Returns the failures cleared."""
    now = time.time() if now is None else now
    with gallery.store.write(bump=False) as conn:
        row = conn.execute(_ROW + gallery.store.row_lock, ('subject', name)).fetchone()
        if row is None and conn.execute('SELECT 1 FROM templates WHERE name = ? LIMIT 1',
                                        (name,)).fetchone() is None:
            raise NotEnrolled(f'{name!r} is not enrolled in {gallery.db_path}')
        cleared = row[0] if row else 0
        if row:
            conn.execute(_SET, (0, 0.0, 'subject', name))
        locked = bool(row) and row[1] > now
        conn.execute(_AUDIT, (now, 'unlock', name, f'{cleared} failure(s) cleared'
                              + (', lockout lifted' if locked else '') + f' by {by}'))
    return cleared


def lockouts(gallery, now=None):
    """[(scope, name, failures, locked until)] of the lockouts in force, soonest end first."""
    now = time.time() if now is None else now
    return gallery.store.read('SELECT scope, name, failures, locked_until FROM attempts WHERE '
                              'locked_until > ? ORDER BY locked_until', (now,))
