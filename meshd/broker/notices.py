"""Telling a sender that its DM was not delivered: the meshd extension `undelivered`.

A DM the broker gives up on (its TTL ran out, or its recipient was removed) is marked
undelivered by the sweeper (Delivery.mark_undelivered). Its sender's member link hears of
it here, if its hello announced the extension (docs/wire-extensions.md): each notice once
per connection, on its hello and on every sweep, until the daemon acks it.
"""
from meshd import clock
from meshd.broker import protocol
from meshd.broker.message_queue import MessageQueue
from meshd.broker.presence import ROLE_MEMBER

EXT_UNDELIVERED = 'undelivered'
NOTICE_BATCH = 500


class UndeliveredNotices(object):
    """Notices of undelivered DMs from `store`, sent to senders' member links; `dm_ttl`
    is stated in each notice; `on_dead(entry)` runs the close path of a failed write."""

    def __init__(self, store, dm_ttl, on_dead):
        self.store = store
        self.dm_ttl = dm_ttl
        self.on_dead = on_dead

    def notify(self, entry, limit=NOTICE_BATCH):
        """Send a sender's member link the notices of its undelivered DMs not yet acked;
        return how many were sent."""
        if entry.role != ROLE_MEMBER or EXT_UNDELIVERED not in entry.ext or not entry.is_live:
            return 0
        sent = 0
        for row_id, cmid, target, reason, created_at, undelivered_at in (
                MessageQueue.undelivered_of(entry.mesh_id, entry.member_id, limit)):
            if row_id in entry.notices_sent:
                continue
            frame = protocol.undelivered_notice(row_id, cmid, target, reason, created_at,
                                                undelivered_at, self.dm_ttl)
            if not entry.send(frame):
                self.on_dead(entry)
                break
            entry.notices_sent.add(row_id)
            sent += 1
        return sent

    def ack(self, entry, frame):
        """`meshd_undelivered_ack {messageId}`: the sender's daemon recorded the notice."""
        row_id = frame.get('messageId')
        if not isinstance(row_id, str) or not row_id:
            return
        self.store.writer.submit(MessageQueue.notice_acked, row_id, entry.member_id,
                                 clock.utcnow())
