"""The outbox drain: pending rows out through their link, a window of sends per link (spec §6).

claudemesh sends one row at a time and sleeps 500 ms between passes, which caps delivery
at a few dozen messages a second and lets one dead mesh stall every other. meshd hands each
claimed row to a greenlet of its link, keeps up to `drain_window` sends in flight per link
with acks matched by id, and never selects rows of a link that is not open, so one
unreachable mesh or session delays only its own rows (DESIGN.md 15). Rows of one link are
claimed and written in acceptance order. A pass claims its rows in one transaction and
outcomes go through the group writer, so a busy drain costs few commits; no network I/O
happens inside a transaction. The drain sees the daemon through what its constructor
gives it: the store, the LinkTable, its timings and the supervisor that runs the sends.
"""
import logging
import re

import gevent.event
from storage.models import Outbox

from meshd import clock, wire
from meshd.greenlets import LOG

log = logging.getLogger(__name__)

BATCH = 32
INFLIGHT_LEASE_MS = 30000
MAX_BACKOFF_MS = 300000
RATE_LIMIT_RETRY_MS = 1000

# One classifier for both link kinds (spec/daemon.md §5.3): these ack errors are final.
_PERMANENT = re.compile(r'payload[ _]too[ _]large|forbidden|not_found|not_authorized|invalid|'
                        r'schema|auth|signature|unknown|blocked by recipient grants', re.I)


def is_permanent(error):
    return bool(_PERMANENT.search(error or ''))


def backoff_ms(attempts, retry_after_ms=0):
    """min(5 min, 500 ms · 2^min(attempts, 12)), never sooner than a retry_after hint."""
    return max(min(MAX_BACKOFF_MS, 500 * 2 ** min(attempts, 12)), retry_after_ms)


class Drain:
    """`step()` runs one pass; `run()` loops until the daemon stops."""

    def __init__(self, store, links, timings, supervisor):
        self.store = store
        self.links = links
        self.timings = timings
        self.supervisor = supervisor
        self.window = int(timings['drain_window'])
        self.wakeup = gevent.event.Event()
        self._expired_at = 0

    def wake(self):
        """Run a pass now (a row was accepted, a link opened, a send ended)."""
        self.wakeup.set()

    def run(self):
        while not self.supervisor.stopping.is_set():
            self.wakeup.clear()
            try:
                self.step()
            except Exception:
                log.exception('drain_tick_failed')
            self.wakeup.wait(self.timings['drain_poll'])

    def step(self, now=None):
        now = clock.now_ms() if now is None else now
        housekeeping = now - self._expired_at >= self.timings['drain_expire_interval'] * 1000
        if housekeeping:
            self._expired_at = now  # a pass per second is enough; it is a write transaction
            self._expire(now)
        with self.store.reading():
            rows = self._due(now)
            if housekeeping:
                rows.extend(self._unroutable(now))
        plan = [(row, action) for row, action in self._plan(rows)]
        if not plan:
            return
        claimed = self._claim([row.id for row, _action in plan], now)
        for row, (kind, link) in plan:
            if row.id not in claimed:
                continue
            if kind == 'send':
                link.in_flight += 1
                self.supervisor.spawn('send:%s' % row.id[:8], self._dispatch, link, row,
                                      on_crash=LOG)
            elif kind == 'no_mesh':
                log.warning('drain_no_broker_for_mesh', extra={'fields': {'id': row.id,
                                                                          'mesh': row.mesh}})
                self._finish(row.id, 'dead', last_error='no_broker_for_mesh:%s' % row.mesh)
            else:  # no session with that key is registered
                log.info('drain_session_ws_not_ready', extra={'fields': {
                    'id': row.id, 'session_pubkey': row.sender_session_pubkey[:12]}})
                self._retry(row.id, row.attempts + 1, row.expires_at, 'session_ws_not_open',
                            now)

    def _due(self, now):
        """Each open link's due pending rows, oldest first, up to the link's free window.

        One indexed read per link (outbox_link_queue, rowid order): a link that is closed,
        full or backed up costs the others nothing, and no pass sorts the whole queue.
        """
        rows = []
        for link in self.links.all():
            room = self.window - link.in_flight
            if not link.is_open or room <= 0:
                continue
            session = link.pubkey if link.kind == 'session' else None
            rows.extend(Outbox.due_for_link(link.mesh['slug'], session, now, room))
        return rows

    def _unroutable(self, now):
        """Due rows no link will ever read: their mesh was left or their session is gone."""
        return Outbox.unroutable(list(self.links.members), [
            link.pubkey for link in self.links.sessions.values()], now, BATCH)

    def _plan(self, rows):
        """(row, (action, link)) for the rows this pass will claim, in acceptance order."""
        planned = {}
        for row in rows:
            if self.links.member(row.mesh) is None:
                yield row, ('no_mesh', None)
                continue
            if row.sender_session_pubkey:
                link = self.links.session_by_pubkey(row.sender_session_pubkey)
                if link is None:
                    # Never fall back to the member link: the row is sealed by the session.
                    yield row, ('no_session', None)
                    continue
            else:
                link = self.links.member(row.mesh)
            taken = planned.get(id(link), 0)
            if not link.is_open or link.in_flight + taken >= self.window:
                continue
            planned[id(link)] = taken + 1
            yield row, ('send', link)

    def _claim(self, ids, now):
        """Claim the still-pending rows among `ids`; return their ids once the claim ran.

        Not waiting for the claim's commit keeps an fsync out of every window slot's cycle.
        If the commit is lost (crash, rolled-back batch) the rows are still pending and go
        out again with the same client_message_id, which the broker deduplicates.
        """
        return self.store.writer.execute(Outbox.claim, ids, now, INFLIGHT_LEASE_MS)

    def _dispatch(self, link, row):
        try:
            frame = wire.send_frame(row.client_message_id, bytes(row.request_fingerprint),
                                    row.target_spec, row.priority, row.nonce, row.ciphertext)
            try:
                result = link.send_message(frame)
            except Exception as exc:
                log.warning('drain_send_threw', extra={'fields': {'id': row.id, 'err': str(exc)}})
                result = {'ok': False, 'error': 'send_threw: %s' % exc, 'transient': True}
        except BaseException:
            link.in_flight -= 1
            self.wakeup.set()
            raise
        # The slot is free once the broker answered: the row stays inflight in the database
        # until its outcome commits, so no pass can pick it up meanwhile.
        link.in_flight -= 1
        self.wakeup.set()
        self._record(row, result)
        self.wakeup.set()  # a row put back to pending is due now

    def _record(self, row, result):
        now = clock.now_ms()
        if result.get('error') == getattr(self._link_of(row), 'not_open_error', None):
            # The link closed between this pass's planning and the send: nothing went out,
            # so the row goes back as it was, with no attempt counted (spec/daemon.md §6).
            self._finish(row.id, 'pending', attempts=row.attempts, next_attempt_at=now)
            return
        if result.get('ok'):
            self._finish(row.id, 'done', delivered_at=now,
                         broker_message_id=result.get('message_id'), last_error=None)
            return
        error = result.get('error') or 'unknown error'
        if error == 'broker_disconnected_1009' and self._frame_too_large(row):
            error = 'payload_too_large: closed 1009 by broker'
        if is_permanent(error) and (not result.get('transient') or error.startswith('payload')):
            log.warning('drain_permanent_failure', extra={'fields': {'id': row.id, 'err': error}})
            self._finish(row.id, 'dead', last_error=error)
            return
        retry_after = RATE_LIMIT_RETRY_MS if error.startswith('rate_limit') else 0
        self._retry(row.id, row.attempts + 1, row.expires_at, error, now, retry_after)

    def _link_of(self, row):
        if row.sender_session_pubkey:
            return self.links.session_by_pubkey(row.sender_session_pubkey)
        return self.links.member(row.mesh)

    def _frame_too_large(self, row):
        return len(row.ciphertext) + len(row.nonce) + 300 > wire.FRAME_LIMIT

    def _retry(self, row_id, attempts, expires_at, error, now, retry_after=0):
        if now >= expires_at:
            log.warning('drain_expired', extra={'fields': {'id': row_id, 'err': error}})
            self._finish(row_id, 'dead', last_error='expired')
            return
        self._finish(row_id, 'pending', last_error=error,
                     next_attempt_at=now + backoff_ms(attempts, retry_after))

    def _finish(self, row_id, status, **fields):
        """The outcome of an inflight row (one write per message sent)."""
        self.store.write(Outbox.finish, row_id, status, **fields)

    def _expire(self, now):
        expired = self.store.write(Outbox.expire_pending, now)
        if expired:
            log.warning('drain_expired', extra={'fields': {'count': expired}})
