"""Statuses from Claude Code hooks: `POST /hook/set-status` (spec/wire.md §7.5, §9.4).

A hook says `working` or `idle` for the presence of a working directory (and pid, when it
knows it); a fresh hook status holds `next`/`low` messages while the agent works, and the
presence is drained when it becomes idle. A status that arrives before its presence exists
waits PENDING_SECONDS for it. `dnd` set by hand is never cleared by a hook.
"""
import datetime

from meshd import clock
from meshd.broker import protocol
from meshd.broker.models import PendingStatus, Presence
from meshd.broker.ratelimit import RateLimiter

PENDING_SECONDS = 10
RATE_PER_MIN = 30


class HookStatus(object):
    """Hook statuses for the presences of `presences`, kept in `store`; `delivery` drains."""

    def __init__(self, presences, store, delivery):
        self.presences = presences
        self.store = store
        self.delivery = delivery
        self.limiter = RateLimiter((RATE_PER_MIN, RATE_PER_MIN))

    def set_status(self, body):
        """The `POST /hook/set-status` route: (HTTP status, JSON answer)."""
        if not isinstance(body, dict) or not body.get('cwd') or not body.get('status'):
            return 200, {'ok': False, 'error': 'cwd and status required'}
        cwd, status, pid = body['cwd'], body['status'], body.get('pid')
        if status not in protocol.STATUSES or not isinstance(cwd, str):
            return 200, {'ok': False, 'error': 'invalid status'}
        pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
        if not self.limiter.take('%s:%s' % (pid, cwd)):
            return 429, {'ok': False, 'error': 'rate limited'}
        now = clock.utcnow()
        candidates = [e for e in self.presences.all() if e.cwd == cwd]
        entry = next((e for e in candidates if pid is not None and e.pid == pid), None)
        if entry is None and candidates:
            entry = max(candidates, key=lambda e: e.generation)
        if entry is None:
            self.store.write(PendingStatus.record, pid, cwd, status, now)
            return 200, {'ok': True, 'pending': True}
        if entry.status == 'dnd':
            return 200, {'ok': True, 'presence_id': entry.presence_id}     # hooks cannot clear dnd
        entry.status, entry.status_source, entry.status_updated_at = status, 'hook', now
        self.store.write(Presence.set_fields, entry.presence_id, status=status,
                         status_source='hook', status_updated_at=now)
        self.delivery.drain(entry)
        return 200, {'ok': True, 'presence_id': entry.presence_id}

    def apply_pending(self, entry, now):
        """A new presence takes the hook status that arrived for it in the last seconds."""
        since = now - datetime.timedelta(seconds=PENDING_SECONDS)
        with self.store.writing():
            row = PendingStatus.take(entry.cwd, entry.pid, since, now)
            if row is None:
                return
            Presence.set_fields(entry.presence_id, status=row.status, status_source='hook',
                                status_updated_at=row.created_at)
        entry.status, entry.status_source, entry.status_updated_at = (row.status, 'hook',
                                                                      row.created_at)
