"""Retention: one pass at start, then hourly (spec/daemon.md §3.3, DESIGN.md 19).

Deletes inbox rows, finished outbox rows and idempotency keys older than 30 days, and trims
the event log to its newest 10 000 rows.
"""
import logging

from storage import db as storage_db
from storage.models import RETENTION_MS, Idempotency, Inbox, Outbox, now_ms

log = logging.getLogger(__name__)


class Pruner:
    """`step(now)` runs one pass and returns what it removed per table."""

    def __init__(self, bus, retention_ms=RETENTION_MS):
        self.bus = bus
        self.retention_ms = retention_ms

    def step(self, now=None):
        cutoff = (now_ms() if now is None else now) - self.retention_ms
        removed = {}
        try:
            with storage_db.writing():
                removed['inbox'] = Inbox.delete().where(Inbox.received_at < cutoff).execute()
                removed['outbox'] = Outbox.delete().where(Outbox.prunable(cutoff)).execute()
                # A key whose row is still queued (a ttl over 30 days) stays taken.
                live = (Outbox.select(Outbox.id)
                        .where(Outbox.status.in_(('pending', 'inflight'))))
                removed['idempotency'] = (Idempotency.delete()
                                          .where((Idempotency.created_at < cutoff)
                                                 & Idempotency.outbox_id.not_in(live))
                                          .execute())
        except Exception as exc:
            log.warning('inbox_prune_failed', extra={'fields': {'err': str(exc)}})
            return removed
        if removed['inbox']:
            log.info('inbox_prune_completed', extra={'fields': {
                'removed': removed['inbox'], 'retention_days': self.retention_ms // 86400000}})
        if removed['outbox'] or removed['idempotency']:
            log.info('outbox_prune_completed', extra={'fields': {
                'outbox': removed['outbox'], 'idempotency': removed['idempotency']}})
        removed['events'] = self.bus.trim()
        if removed['events']:
            log.info('event_log_trimmed', extra={'fields': {'removed': removed['events']}})
        return removed
