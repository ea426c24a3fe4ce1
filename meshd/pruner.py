"""Retention: one pass at start, then hourly (spec/daemon.md §3.3, DESIGN.md 19).

Deletes inbox rows, finished outbox rows, idempotency keys and address-book sessions older
than 30 days, trims the event log to its newest 10 000 rows, then gives the freed pages back
to the file system.
Every delete is a small batch through the group writer and every vacuum step a few hundred
pages, so other calls are answered between them: one DELETE of 100 000 rows held the write
lock (and the hub) for seconds, and the file never shrank.
"""
import logging

import gevent
from storage.models import (RETENTION_MS, AddressBook, Idempotency, Inbox, Outbox,
                            return_free_pages)

from meshd import clock

log = logging.getLogger(__name__)

BATCH = 200           # rows deleted per transaction
VACUUM_PAGES = 128    # pages returned to the file system per transaction


class Pruner:
    """`step(now)` runs one pass and returns what it removed per table."""

    def __init__(self, store, bus, retention_ms=RETENTION_MS, batch=BATCH):
        self.store = store
        self.bus = bus
        self.retention_ms = retention_ms
        self.batch = batch

    def step(self, now=None):
        cutoff = (clock.now_ms() if now is None else now) - self.retention_ms
        removed = {}
        try:
            for table, prune in (('inbox', Inbox.prune), ('outbox', Outbox.prune),
                                 ('idempotency', Idempotency.prune),
                                 ('address_book', AddressBook.prune)):
                removed[table] = self._in_batches(prune, cutoff)
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

    def _in_batches(self, prune, cutoff):
        """Run `prune(cutoff, batch)` a transaction at a time until a batch is short."""
        total = 0
        while True:
            count = self.store.write(prune, cutoff, self.batch)
            total += count
            if count < self.batch:
                return total
            _let_others_in()

    def vacuum(self):
        """Give free pages back to the file system, VACUUM_PAGES per transaction."""
        returned = 0
        while True:
            freed = self.store.write(return_free_pages, VACUUM_PAGES)
            returned += freed
            if freed < VACUUM_PAGES:
                return returned
            _let_others_in()


def _let_others_in():
    # Handing writes to the writer greenlet and back is a chain of callbacks, which the
    # hub runs before it polls sockets or fires timers: without waiting for an idle loop
    # between batches, RPC connections were not read for a second at a time.
    gevent.idle()
