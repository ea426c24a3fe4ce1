"""The one clock of meshd: wall-clock time as the daemon and the broker store and show it.

Daemon rows keep Unix epoch milliseconds (`now_ms`); the broker's rows keep naive UTC
datetimes (`utcnow`), as its peewee models always did; both are shown as ISO-8601 with
milliseconds and a Z, the way JavaScript's toISOString writes them (`iso_from_ms`).
"""
import datetime
import time


def now_ms():
    """The current time in Unix epoch milliseconds."""
    return int(time.time() * 1000)


def utcnow():
    """Naive UTC now: every timestamp the broker stores is naive UTC."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


_SECONDS_CACHE = {}          # epoch second -> 'YYYY-MM-DDTHH:MM:SS'
_SECONDS_CACHE_SIZE = 4096


def iso_from_ms(ms):
    """ISO time of `ms` (epoch milliseconds; None means now), as JavaScript's toISOString."""
    if ms is None:
        ms = now_ms()
    seconds, millis = divmod(int(ms), 1000)
    # Listings format up to four times per row, and rows cluster in the same seconds: the
    # date and time of a second are formatted once (time.gmtime, not datetime, when not).
    stamp = _SECONDS_CACHE.get(seconds)
    if stamp is None:
        if len(_SECONDS_CACHE) >= _SECONDS_CACHE_SIZE:
            _SECONDS_CACHE.clear()
        stamp = _SECONDS_CACHE[seconds] = '%04d-%02d-%02dT%02d:%02d:%02d' % time.gmtime(
            seconds)[:6]
    return '%s.%03dZ' % (stamp, millis)


def iso_now():
    """Now as UTC ISO-8601 with milliseconds and a Z suffix."""
    return iso_from_ms(None)
