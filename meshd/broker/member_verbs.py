"""A member's own verbs about itself: its grants and the fate of its DMs (meshd extensions).

Two meshd extensions (docs/wire-extensions.md), both answered only to the member whose
connection asks, from its member link or any of its session links:

- `grants`: `meshd_grants_get` and `meshd_grants_set` read and edit the member's own
  per-sender grants (`member.peer_grants`, spec/wire.md §8.3). A recipient decides who
  may reach it; nobody edits another member's grants. Delivery reads the grants afresh
  for every send (its cache lives for one fan-out only), so a change holds for the next
  DM or broadcast.
- `message_status`: what became of one DM this member sent (queued, delivered or
  undelivered), by the broker's id or the send's client id.
"""
import re

from meshd import crypto
from meshd.broker import protocol
from meshd.broker.message_queue import MessageQueue
from meshd.broker.models import Member

MAX_GRANT_ENTRIES = 1000        # senders with an entry, per member: the row stays small
MAX_CAPABILITIES = 16
MAX_ID_LENGTH = 256
_CAPABILITY = re.compile(r'^[a-z][a-z-]{0,31}$')
MULTICAST_PREFIXES = ('*', '@')

STATUS_QUEUED = 'queued'
STATUS_DELIVERED = 'delivered'
STATUS_UNDELIVERED = 'undelivered'


def _invalid(entry, frame, message):
    entry.send(protocol.error('invalid', message, req_id=protocol.req_id(frame)))


def _capabilities(value):
    """A grant's capabilities, deduplicated in order; None when `value` is not a valid list."""
    if not isinstance(value, list) or len(value) > MAX_CAPABILITIES:
        return None
    caps = []
    for cap in value:
        if not isinstance(cap, str) or not _CAPABILITY.match(cap):
            return None
        if cap not in caps:
            caps.append(cap)
    return caps


def _store_grant(member_id, peer, caps, limit):
    """In the writer: set (a list) or remove (None) one sender's entry of a member's
    grants; the grants as stored, or None when a new entry would pass `limit`.

    Read and written in the same transaction of the one writer, so two edits of one
    member never lose each other's entry."""
    grants = Member.grants_of(member_id)
    if not isinstance(grants, dict):
        grants = {}
    if caps is None:
        if peer not in grants:
            return grants
        del grants[peer]
    else:
        if peer not in grants and len(grants) >= limit:
            return None
        grants[peer] = caps
    Member.set_grants(member_id, grants)
    return grants


def _message_id(frame, key):
    """(value, error): a present id must be a non-empty string of at most 256 characters."""
    value = frame.get(key)
    if value is None:
        return None, None
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        return None, '%s must be a non-empty string of at most %d characters' % (
            key, MAX_ID_LENGTH)
    return value, None


def _status(row):
    # delivered_at wins: a DM marked undelivered can still be acked by a recipient that
    # held it (MessageQueue.ack does not look at undelivered_at), and then it was read.
    if row.target_spec.startswith(MULTICAST_PREFIXES) or row.delivered_at is not None:
        return STATUS_DELIVERED
    if row.undelivered_at is not None:
        return STATUS_UNDELIVERED
    return STATUS_QUEUED


def _iso_or_none(value):
    return protocol.iso(value) if value is not None else None


class MemberVerbs(object):
    """Handlers `(entry, frame)` of the `grants` and `message_status` extensions; `store`
    runs the grant writes through its group writer."""

    def __init__(self, store):
        self.store = store

    def handlers(self):
        return {'meshd_grants_get': self.grants_get, 'meshd_grants_set': self.grants_set,
                'message_status': self.message_status}

    # ------------------------------------------------------------------ grants

    def _send_grants(self, entry, frame, grants):
        reply = {'type': 'meshd_grants', 'grants': grants,
                 'defaults': list(protocol.DEFAULT_CAPS)}
        entry.send(protocol.with_req(reply, frame))

    def grants_get(self, entry, frame):
        grants = Member.grants_of(entry.member_id)
        self._send_grants(entry, frame, grants if isinstance(grants, dict) else {})

    def grants_set(self, entry, frame):
        peer = frame.get('peer')
        if not crypto.is_hex64(peer, any_case=True):
            return _invalid(entry, frame, 'peer must be a 64-character hex pubkey')
        if 'capabilities' not in frame:
            # Required even to reset: a frame that forgot it must not unblock a sender.
            return _invalid(entry, frame, 'capabilities required (a list, or null for the '
                                          'defaults)')
        caps = frame['capabilities']
        if caps is not None:
            caps = _capabilities(caps)
            if caps is None:
                return _invalid(entry, frame, 'capabilities must be a list of at most %d '
                                              'names matching ^[a-z][a-z-]{0,31}$'
                                % MAX_CAPABILITIES)
        grants = self.store.write(_store_grant, entry.member_id, peer.lower(), caps,
                                  MAX_GRANT_ENTRIES)
        if grants is None:
            return _invalid(entry, frame, 'at most %d grant entries per member'
                            % MAX_GRANT_ENTRIES)
        # Written after the commit: the next send's preflight reads the new grants.
        self._send_grants(entry, frame, grants)

    # ------------------------------------------------------------------ message status

    def message_status(self, entry, frame):
        req_id = protocol.req_id(frame)
        message_id, error = _message_id(frame, 'messageId')
        if error is None:
            client_id, error = _message_id(frame, 'clientMessageId')
        if error is None and message_id is None and client_id is None:
            error = 'messageId or clientMessageId required'
        if error is not None:
            return _invalid(entry, frame, error)
        # Only this member's own sends: the broker id wins when both are given.
        row = MessageQueue.sent_by(entry.mesh_id, entry.member_id, message_id,
                                   None if message_id is not None else client_id)
        if row is None:
            entry.send(protocol.error('not_found', 'message not found', req_id=req_id))
            return
        status = _status(row)
        reply = {'type': 'message_status_result', 'messageId': row.id,
                 'clientMessageId': row.client_message_id, 'targetSpec': row.target_spec,
                 'status': status, 'createdAt': protocol.iso(row.created_at),
                 'deliveredAt': _iso_or_none(row.delivered_at),
                 'expiresAt': protocol.iso(row.expires_at),
                 'undeliveredReason': (row.undelivered_reason
                                       if status == STATUS_UNDELIVERED else None)}
        entry.send(protocol.with_req(reply, frame))
