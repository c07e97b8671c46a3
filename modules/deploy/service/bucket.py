"""The per-token request bucket of the service: `burst` requests at once, then `rate` per second.

A token bucket (rather than the fixed, moving or sliding windows of the `limits` library, which
offers no bucket: a window of `burst` requests per `burst / rate` s lets a client spend its whole
window at once and then waits it out) refilled continuously. Its state is per service process:
several instances each give a token its own bucket (docs/service.md says so); the attempt
counters that bound guessing live in the gallery instead (modules.deploy.attempts).
"""
import time

RATE = 10.0  # requests per second and token, in the long run
BURST = 20  # requests a token may send at once


class TokenBucket:
    """Buckets by key (a token digest): `take(key)` spends one request or says how long to wait."""

    def __init__(self, rate, burst, clock=time.monotonic):
        self.rate = float(rate)
        self.burst = float(burst)
        self.clock = clock
        self.state = {}  # key -> (requests left, when counted); one entry per live token

    def take(self, key):
        """0.0 when a request of `key` may pass (one taken from its bucket), else the seconds
        until one may."""
        now = self.clock()
        left, then = self.state.get(key, (self.burst, now))
        left = min(self.burst, left + (now - then) * self.rate)
        if left >= 1.0:
            self.state[key] = (left - 1.0, now)
            return 0.0
        self.state[key] = (left, now)
        return (1.0 - left) / self.rate
