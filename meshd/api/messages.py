"""send and peers.list (spec/daemon.md §8.2, §8.3)."""
import logging

from rpc.protocol import NOT_FOUND, UPSTREAM_ERROR, RpcError

from meshd.api.common import KIB, mesh_from_ctx
from meshd.clock import iso_from_ms

log = logging.getLogger(__name__)


class MessageMethods:
    """Sending and who can be reached: `sender` (meshd/send.py), the LinkTable and the
    address book of `directory` (meshd/directory.py)."""

    def __init__(self, sender, links, directory):
        self.sender = sender
        self.links = links
        self.directory = directory

    def handlers(self):
        return [
            ('send', self.send,
             {'session': 'optional', 'params_limit': 256 * KIB, 'pipelined': True,
              'result': '{client_message_id, status, duplicate, broker_message_id, mesh, '
                        'target_spec, expires_at, recipient_name, recipient_online, '
                        'recipient_unknown, broker_dm_ttl}'}),
            ('peers.list', self.peers_list,
             {'session': 'optional', 'result': '{peers:[…], offline:[…], unreachable}'}),
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
