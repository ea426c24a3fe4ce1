"""send, peers.list and message.status (spec/daemon.md §8.2, §8.3; docs/local-api.md)."""
import logging

from rpc.protocol import NOT_FOUND, UPSTREAM_ERROR, RpcError, invalid_params
from storage.models import Outbox

from meshd import broker_calls as calls
from meshd.api.common import KIB, iso, mesh_from_ctx
from meshd.clock import iso_from_ms

MESSAGE_STATUS_FEATURE = 'message_status'
# An outbox row's status, as one word of message.status's `delivery`.
_OUTBOX_DELIVERY = {'pending': 'pending', 'inflight': 'pending', 'dead': 'failed',
                    'aborted': 'failed', 'undelivered': 'undelivered'}

log = logging.getLogger(__name__)


class MessageMethods:
    """Sending and who can be reached: `sender` (meshd/send.py), the LinkTable, the
    address book of `directory` (meshd/directory.py) and the outbox in `store`."""

    def __init__(self, sender, links, directory, store):
        self.sender = sender
        self.links = links
        self.directory = directory
        self.store = store

    def handlers(self):
        return [
            ('send', self.send,
             {'session': 'optional', 'params_limit': 256 * KIB, 'pipelined': True,
              'result': '{client_message_id, status, duplicate, broker_message_id, mesh, '
                        'target_spec, expires_at, recipient_name, recipient_online, '
                        'recipient_unknown, broker_dm_ttl}'}),
            ('peers.list', self.peers_list,
             {'session': 'optional', 'result': '{peers:[…], offline:[…], unreachable}'}),
            ('message.status', self.message_status,
             {'session': 'optional', 'result': '{client_message_id, mesh, target_spec, '
                                               'outbox_status, attempts, broker_message_id, '
                                               'delivery, '
                                               'delivered_at, expires_at, last_error}'}),
        ]

    def send(self, ctx, to: str = None, message: str = None, mesh: str = None,
             priority: str = None, meta: dict = None, reply_to_id: str = None,
             client_message_id: str = None, ttl: int = None, strict: bool = False):
        """Queue a message durably (DM, @group or * broadcast); answers once it is in the outbox."""
        return self.sender.send(ctx.session, to, message, mesh=mesh, priority=priority,
                                meta=meta, reply_to_id=reply_to_id,
                                client_message_id=client_message_id, ttl=ttl, strict=strict)

    def peers_list(self, ctx, mesh: str = None):
        """The peers of one mesh (default: the session's) or of every joined mesh, concurrently."""
        slug = mesh_from_ctx(ctx, mesh)
        if slug is not None and slug not in self.links.meshes:
            raise RpcError.of(NOT_FOUND, 'mesh_not_attached', 'mesh not attached: %s' % slug,
                              mesh=slug)
        slugs = [slug] if slug is not None else sorted(self.links.meshes)
        rosters = self.links.rosters(slugs)
        peers, offline, unreachable = [], [], []
        for name in slugs:
            roster = rosters[name]
            if roster is None:
                unreachable.append(name)
                log.warning('ipc_peers_broker_failed', extra={'fields': {
                    'mesh': name, 'err': 'broker unreachable'}})
                continue
            peers.extend(dict(peer, mesh=name) for peer in roster if isinstance(peer, dict))
            offline.extend(self._offline_members(name, roster))
        if slugs and len(unreachable) == len(slugs):
            raise RpcError.of(UPSTREAM_ERROR, 'broker_unreachable', 'no broker answered',
                              detail='unreachable: %s' % ', '.join(unreachable),
                              unreachable=unreachable)
        return {'peers': peers, 'offline': offline, 'unreachable': unreachable}

    def _offline_members(self, slug, roster):
        """Members of the address book with no live row in `roster` (DESIGN.md 17)."""
        here = {str(p.get(key, '')).lower() for p in roster if isinstance(p, dict)
                and not p.get('grace') for key in ('pubkey', 'memberPubkey')}
        return [{'mesh': slug, 'displayName': entry.name, 'pubkey': entry.pubkey,
                 'memberPubkey': entry.pubkey, 'lastSeenAt': iso_from_ms(entry.last_seen_at),
                 'offline': True}
                for entry in self.directory.members(slug) if entry.pubkey not in here]

    def message_status(self, ctx, client_message_id: str = None):
        """What became of a message sent from here: pending, queued, delivered or failed."""
        if not isinstance(client_message_id, str) or not client_message_id.strip():
            raise invalid_params("missing 'client_message_id'")
        cmid = client_message_id.strip()
        with self.store.reading():
            row = Outbox.get_or_none(Outbox.client_message_id == cmid)
        if row is None:
            raise RpcError.of(NOT_FOUND, 'not_found', 'no message %s in the outbox' % cmid,
                              client_message_id=cmid)
        result = {'client_message_id': cmid, 'mesh': row.mesh, 'target_spec': row.target_spec,
                  'outbox_status': row.status, 'attempts': row.attempts,
                  'broker_message_id': row.broker_message_id,
                  'delivery': _OUTBOX_DELIVERY.get(row.status, 'unknown'),
                  'delivered_at': None, 'expires_at': iso(row.expires_at),
                  'last_error': row.last_error}
        if row.status != 'done':
            return result
        if row.target_spec == '*' or row.target_spec.startswith('@'):
            # The broker fans a multicast out at once and keeps no per-recipient state.
            result.update(delivery='delivered', delivered_at=iso(row.delivered_at))
            return result
        link = self.links.member(row.mesh)
        if link is None or not link.is_open or MESSAGE_STATUS_FEATURE not in link.broker_features:
            return result          # accepted by the broker, which cannot tell us more
        frame = {'type': 'message_status', 'clientMessageId': cmid}
        if row.broker_message_id:
            frame['messageId'] = row.broker_message_id
        try:
            reply = calls.call(link, row.mesh, frame)
        except RpcError as exc:
            result['detail'] = exc.message
            return result
        status = reply.get('status')
        if status in ('queued', 'delivered', 'undelivered'):
            result['delivery'] = status
        result['delivered_at'] = reply.get('deliveredAt')
        if reply.get('expiresAt'):
            result['expires_at'] = reply['expiresAt']
        if reply.get('undeliveredReason'):
            result['last_error'] = result['last_error'] or reply['undeliveredReason']
        return result
