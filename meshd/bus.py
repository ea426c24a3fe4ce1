"""The in-process event bus, backed by the durable `events` table (spec/daemon.md §3.6, §7.3).

Publishing appends the event to the log first, then hands it to live subscribers, so a
subscriber that resumes with `since_seq` misses nothing and sees nothing twice. A failing
subscriber is isolated from the others.
"""
import json
import logging

from storage.models import Event

from meshd.clock import iso_now

log = logging.getLogger(__name__)

TRIM_EVERY = 100


class EventBus:
    """Appends events to the log of `store` and fans them out to subscribers."""

    def __init__(self, store, epoch):
        self.store = store
        self.epoch = epoch
        self._subscribers = []
        self._inserts = 0

    def reset_log(self):
        """Empty the log at start: events of an earlier epoch are never replayed."""
        with self.store.writing():
            Event.clear()

    def append(self, kind, data):
        """Write the event row (inside the caller's transaction, if any); return the event."""
        ts = iso_now()
        mesh = data.get('mesh') if isinstance(data.get('mesh'), str) else None
        values = (self.epoch, kind, ts, mesh, data.get('recipient_kind'),
                  data.get('recipient_pubkey'), json.dumps(data, ensure_ascii=False))
        if self.store.in_write():
            seq = self._insert(values)  # the caller's transaction: no savepoint of its own
        else:
            with self.store.writing():
                seq = self._insert(values)
        return {'seq': seq, 'epoch': self.epoch, 'kind': kind, 'ts': ts, 'data': data}

    def _insert(self, values):
        seq = Event.append(*values)
        self._inserts += 1
        if self._inserts % TRIM_EVERY == 0:
            Event.trim(seq)
        return seq

    def deliver(self, event):
        """Hand a committed event to every live subscriber."""
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception('event subscriber failed')

    def publish(self, kind, data):
        """Append, then deliver; a failure is logged, never raised. Call it outside any
        transaction."""
        try:
            event = self.append(kind, data)
        except Exception:
            log.exception('event publish failed')
            return None
        self.deliver(event)
        return event

    def trim(self):
        """Keep the newest rows of the log; return how many were removed."""
        with self.store.writing():
            return Event.trim()

    def subscribe(self, callback):
        """Register `callback(event)`; returns a function that unregisters it."""
        self._subscribers.append(callback)

        def unsubscribe():
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    @property
    def subscriber_count(self):
        return len(self._subscribers)

    def replay(self, since_seq):
        """Retained events after `since_seq`, oldest first, as event dicts."""
        with self.store.reading():
            rows = Event.after(since_seq, self.epoch)
        return [{'seq': row.seq, 'epoch': row.epoch, 'kind': row.kind, 'ts': row.ts,
                 'data': json.loads(row.data)} for row in rows]

    def bounds(self):
        """(oldest retained seq or None, newest seq or 0)."""
        with self.store.reading():
            return Event.oldest_seq(), Event.newest_seq()
