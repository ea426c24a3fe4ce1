"""Timing constants, shortened in tests through MESHD_TEST_TIMINGS.

MESHD_TEST_TIMINGS is a JSON object read once at start by the daemon and the broker. It exists
for the test suite only (DESIGN.md 20): it shortens leases, grace windows, watchdogs, backoff
and TTLs so that tests can wait on events instead of real minutes. The daemon and the broker
share the variable, so each ignores keys it does not define; a value that is not a
non-negative number is an error.
"""
import json
import os

from meshd.exceptions import ConfigError

ENV_VAR = 'MESHD_TEST_TIMINGS'


def load(defaults, environ=None):
    """Return a copy of `defaults` (name -> seconds) with the overrides of MESHD_TEST_TIMINGS."""
    environ = os.environ if environ is None else environ
    values = dict(defaults)
    raw = environ.get(ENV_VAR)
    if not raw:
        return values
    try:
        overrides = json.loads(raw)
    except ValueError as exc:
        raise ConfigError('%s is not JSON: %s' % (ENV_VAR, exc))
    if not isinstance(overrides, dict):
        raise ConfigError('%s must be a JSON object' % ENV_VAR)
    for name, value in overrides.items():
        if name not in defaults:
            # Daemon and broker share the variable; each ignores the other's keys.
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError('%s: %s must be a non-negative number' % (ENV_VAR, name))
        values[name] = value
    return values
