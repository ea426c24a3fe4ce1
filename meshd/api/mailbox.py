"""inbox.* and outbox.* (spec/daemon.md §3.1, §3.2, §8.2, §8.5)."""
import uuid

from rpc.protocol import CONFLICT, NOT_FOUND, RpcError, invalid_params
from storage.models import OUTBOX_STATUSES, Inbox, Outbox

from meshd import clock
from meshd.api.common import KIB, clamp, inbox_scope, iso, iso_to_ms, mesh_from_ctx

_REQUEUE_REFUSED = {
    'not_allowed': ('row not found, already aborted, or already done', 'requeue_not_allowed'),
    'in_use': ('client_message_id already in use', 'client_message_id_in_use'),
}


class MailboxMethods:
    """What the daemon received and sent, in `store`; a session sees only its scope
    (`member_pubkey(slug)` is the member key of a joined mesh); `wake_drain()` after a
    requeue."""

    def __init__(self, store, member_pubkey, wake_drain):
        self.store = store
        self.member_pubkey = member_pubkey
        self.wake_drain = wake_drain

    def handlers(self):
        return [
            ('inbox.list', self.inbox_list,
             {'session': 'optional', 'renames': {'from': 'sender'},
              'result': '{items:[…], marked_seen}'}),
            ('inbox.mark_seen', self.inbox_mark_seen,
             {'session': 'optional', 'result': '{marked_seen}'}),
            ('inbox.flush', self.inbox_flush, {'session': 'optional', 'result': '{removed}'}),
            ('inbox.delete', self.inbox_delete,
             {'session': 'optional', 'result': '{removed, id}'}),
            ('outbox.list', self.outbox_list, {'result': '{items:[…]}'}),
            ('outbox.requeue', self.outbox_requeue,
             {'params_limit': 4 * KIB,
              'result': '{aborted_row_id, new_row_id, new_client_message_id}'}),
        ]

    def _scope(self, ctx):
        return inbox_scope(ctx, self.member_pubkey)

    # -- inbox -------------------------------------------------------------------------

    def inbox_list(self, ctx, since: str = None, topic: str = None, sender: str = None,
                   limit: int = None, mesh: str = None, unread_only: bool = False,
                   mark_seen: bool = False):
        """List received messages visible to the caller, newest first."""
        since_ms = iso_to_ms(since, 'since') if since is not None else None
        with self.store.reading():
            rows = Inbox.listing(self._scope(ctx), since=since_ms, topic=topic, sender=sender,
                                 mesh=mesh_from_ctx(ctx, mesh), unread_only=unread_only,
                                 limit=clamp(limit, 100, 1, 1000))
        items = [inbox_item(row) for row in rows]
        marked = 0
        if mark_seen:
            unseen = [row.id for row in rows if row.seen_at is None]
            marked = self.store.write(Inbox.mark_seen, unseen, clock.now_ms())
        return {'items': items, 'marked_seen': marked}

    def inbox_mark_seen(self, ctx, ids: list = None):
        """Mark inbox rows seen; rows already seen keep their first timestamp."""
        if ids is None or not all(isinstance(i, str) for i in ids):
            raise invalid_params("missing 'ids' (string[])")
        scope = self._scope(ctx)
        if scope is not None:
            with self.store.reading():
                ids = Inbox.ids_in_scope(ids, scope)
        return {'marked_seen': self.store.write(Inbox.mark_seen, ids, clock.now_ms())}

    def inbox_flush(self, ctx, mesh: str = None, before: str = None):
        """Delete the caller's inbox rows, optionally of one mesh and older than `before`."""
        before_ms = iso_to_ms(before, 'before') if before is not None else None
        removed = self.store.write(Inbox.flush, self._scope(ctx), mesh_from_ctx(ctx, mesh),
                                   before_ms)
        return {'removed': removed}

    def inbox_delete(self, ctx, id: str = None):  # noqa: A002 - the wire name is `id`
        """Delete one inbox row within the caller's scope."""
        if not id:
            raise invalid_params('missing id')
        if not self.store.write(Inbox.delete_one, id, self._scope(ctx)):
            raise RpcError.of(NOT_FOUND, 'not_found', 'inbox row not found', id=id)
        return {'removed': 1, 'id': id}

    # -- outbox ------------------------------------------------------------------------

    def outbox_list(self, ctx, status: str = None, limit: int = None):
        """List outbox rows newest first, optionally of one status."""
        if status not in OUTBOX_STATUSES:
            status = None  # an unknown status is ignored, as claudemesh does
        with self.store.reading():
            rows = Outbox.newest(status, clamp(limit, 50, 1, 500))
        return {'items': [_outbox_item(row) for row in rows]}

    def outbox_requeue(self, ctx, id: str = None,  # noqa: A002 - the wire name is `id`
                       new_client_message_id: str = None, aborted_by: str = 'operator'):
        """Abort a pending, inflight, dead or undelivered row; queue a copy under a new id."""
        if not id:
            raise invalid_params("missing 'id'")
        new_cmid = (new_client_message_id or '').strip() or str(uuid.uuid4())
        new_id = str(uuid.uuid4())
        refused = self.store.write(Outbox.requeue, id, new_id, new_cmid, clock.now_ms(),
                                   aborted_by or 'operator')
        if refused is not None:
            message, reason = _REQUEUE_REFUSED[refused]
            raise RpcError.of(CONFLICT, 'conflict', message, reason=reason)
        self.wake_drain()
        return {'aborted_row_id': id, 'new_row_id': new_id, 'new_client_message_id': new_cmid}


def inbox_item(row):
    return {'id': row.id, 'client_message_id': row.client_message_id,
            'broker_message_id': row.broker_message_id, 'mesh': row.mesh, 'topic': row.topic,
            'sender_pubkey': row.sender_pubkey, 'sender_name': row.sender_name,
            'sender_member_pubkey': row.sender_member_pubkey,
            'body': row.body, 'received_at': iso(row.received_at),
            'reply_to_id': row.reply_to_id, 'seen_at': iso(row.seen_at),
            'recipient_pubkey': row.recipient_pubkey, 'recipient_kind': row.recipient_kind,
            'decrypt_failed': bool(row.decrypt_failed), 'e2e': bool(row.e2e),
            'priority': row.priority or 'next', 'emitted_at': iso(row.emitted_at),
            'surfaced_at': iso(row.surfaced_at), 'surfaced_via': row.surfaced_via}


def _outbox_item(row):
    return {'id': row.id, 'client_message_id': row.client_message_id, 'status': row.status,
            'attempts': row.attempts, 'enqueued_at': iso(row.enqueued_at),
            'next_attempt_at': iso(row.next_attempt_at),
            'delivered_at': iso(row.delivered_at), 'broker_message_id': row.broker_message_id,
            'last_error': row.last_error, 'aborted_at': iso(row.aborted_at),
            'aborted_by': row.aborted_by, 'superseded_by': row.superseded_by,
            'payload_bytes': len(row.payload or b''), 'mesh': row.mesh,
            'target_spec': row.target_spec, 'expires_at': iso(row.expires_at)}
