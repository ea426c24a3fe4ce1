"""The per-member send rate limit (spec/wire.md §8.2, DESIGN.md 21).

A token bucket per member id, refilled continuously from a monotonic clock. A refused attempt
consumes no token. `--rate-limit BURST:PER_MIN` sizes it (default 60:600), `off` disables it.
"""
import time

from meshd.exceptions import ConfigError

DEFAULT_SPEC = '60:600'
IDLE_SECONDS = 600


def parse_spec(spec):
    """Parse `BURST:PER_MIN` or `off`; return (burst, per_min) or None for off."""
    if spec is None:
        spec = DEFAULT_SPEC
    if isinstance(spec, (tuple, list)):
        return (int(spec[0]), int(spec[1]))
    spec = str(spec).strip().lower()
    if spec == 'off':
        return None
    try:
        burst, per_min = spec.split(':')
        burst, per_min = int(burst), int(per_min)
    except ValueError:
        raise ConfigError('--rate-limit must be BURST:PER_MIN or off, not %r' % spec)
    if burst < 1 or per_min < 1:
        raise ConfigError('--rate-limit values must be positive: %r' % spec)
    return burst, per_min


class RateLimiter(object):
    """Token buckets keyed by member id; `limits` is (burst, per_min) or None for no limit."""

    def __init__(self, limits):
        self.limits = limits
        self._buckets = {}

    @property
    def burst(self):
        return self.limits[0] if self.limits else 0

    @property
    def per_min(self):
        return self.limits[1] if self.limits else 0

    def take(self, key, now=None):
        """Consume one token for `key`; False (nothing consumed) when the bucket is empty."""
        if self.limits is None:
            return True
        now = time.monotonic() if now is None else now
        burst, per_min = self.limits
        tokens, last = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * per_min / 60.0)
        if tokens < 1.0 - 1e-9:     # float refill must not lose a whole token
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (max(0.0, tokens - 1.0), now)
        return True

    def sweep(self, now=None):
        """Forget buckets idle for 10 minutes (they would be full again anyway)."""
        now = time.monotonic() if now is None else now
        for key in [k for k, (_, last) in self._buckets.items() if now - last > IDLE_SECONDS]:
            del self._buckets[key]
