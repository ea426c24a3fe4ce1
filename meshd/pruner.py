"""Retention: one pass at start, then hourly (spec/daemon.md §3.3, DESIGN.md 19).

Deletes inbox rows, finished outbox rows and idempotency keys older than 30 days, trims the
event log to its newest 10 000 rows, then gives the freed pages back to the file system.
Every delete is a small batch through the group writer and every vacuum step a few hundred
pages, so other calls are answered between them: one DELETE of 100 000 rows held the write
lock (and the hub) for seconds, and the file never shrank.
"""
import logging

import gevent
from storage import db as storage_db
from storage.models import FINISHED_STATUSES, RETENTION_MS
from meshd import clock

log = logging.getLogger(__name__)

BATCH = 200           # rows deleted per transaction
VACUUM_PAGES = 128    # pages returned to the file system per transaction

_FINISHED = ', '.join("'%s'" % status for status in FINISHED_STATUSES)
# (table, condition on rows past retention); the parameter is the cut-off in ms.
_RULES = (
    ('inbox', '"received_at" < ?'),
    ('outbox', '"status" IN (%s) AND "enqueued_at" < ?' % _FINISHED),
    # A key whose row is still queued (a ttl over 30 days) stays taken.
    ('idempotency', '"created_at" < ? AND "outbox_id" NOT IN (SELECT "id" FROM "outbox" '
                    'WHERE "status" IN (\'pending\', \'inflight\'))'),
)


class Pruner:
    """`step(now)` runs one pass and returns what it removed per table."""

    def __init__(self, bus, retention_ms=RETENTION_MS, batch=BATCH):
        self.bus = bus
        self.retention_ms = retention_ms
        self.batch = batch

    def step(self, now=None):
        cutoff = (clock.now_ms() if now is None else now) - self.retention_ms
        removed = {}
        try:
            for table, condition in _RULES:
                removed[table] = self._delete(table, condition, cutoff)
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
        removed['pages'] = self.vacuum()
        if removed['pages']:
            log.info('database_pages_returned', extra={'fields': {'pages': removed['pages']}})
        return removed

    def _delete(self, table, condition, cutoff):
        """Delete the matching rows of `table` a batch per transaction; return the count."""
        sql = ('DELETE FROM "%s" WHERE rowid IN (SELECT rowid FROM "%s" WHERE %s LIMIT ?)'
               % (table, table, condition))
        total = 0
        while True:
            count = storage_db.write(_execute_count, sql, [cutoff, self.batch])
            total += count
            if count < self.batch:
                return total
            _let_others_in()

    def vacuum(self):
        """Give free pages back to the file system, VACUUM_PAGES per transaction."""
        returned = 0
        while True:
            free = storage_db.write(_vacuum_step, VACUUM_PAGES)
            returned += free
            if free < VACUUM_PAGES:
                return returned
            _let_others_in()


def _let_others_in():
    # Handing writes to the writer greenlet and back is a chain of callbacks, which the
    # hub runs before it polls sockets or fires timers: without waiting for an idle loop
    # between batches, RPC connections were not read for a second at a time.
    gevent.idle()


def _execute_count(sql, params):
    return storage_db.db.execute_sql(sql, params).rowcount


def _vacuum_step(pages):
    """Return up to `pages` free pages to the file system; return how many it returned."""
    before = storage_db.db.execute_sql('PRAGMA freelist_count').fetchone()[0]
    # The pragma frees one page per step of its statement, and Python's sqlite3 steps a
    # statement without result columns only once: one page per execution.
    for _ in range(min(before, pages)):
        storage_db.db.execute_sql('PRAGMA incremental_vacuum(1)')
    return before - storage_db.db.execute_sql('PRAGMA freelist_count').fetchone()[0]
