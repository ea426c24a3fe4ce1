"""send and peers.list (spec/daemon.md §8.2, §8.3)."""
import logging

from rpc.protocol import NOT_FOUND, UPSTREAM_ERROR, RpcError

from meshd.api.common import KIB, mesh_from_ctx

log = logging.getLogger(__name__)


class MessageMethods:
    """Sending and who can be reached: `sender` (meshd/send.py) and the LinkTable."""

    def __init__(self, sender, links):
        self.sender = sender
        self.links = links

    def handlers(self):
        return [
            ('send', self.send,
             {'session': 'optional', 'params_limit': 256 * KIB, 'pipelined': True,
              'result': '{client_message_id, status, duplicate, broker_message_id, mesh, '
                        'target_spec, expires_at, recipient_name, recipient_online, '
                        'broker_dm_ttl}'}),
            ('peers.list', self.peers_list,
             {'session': 'optional', 'result': '{peers:[…], unreachable}'}),
        ]

    def send(self, ctx, to: str = None, message: str = None, mesh: str = None,
             priority: str = None, meta: dict = None, reply_to_id: str = None,
             client_message_id: str = None, ttl: int = None):
        """Queue a message durably (DM, @group or * broadcast); answers once it is in the outbox."""
        return self.sender.send(ctx.session, to, message, mesh=mesh, priority=priority,
                                meta=meta, reply_to_id=reply_to_id,
                                client_message_id=client_message_id, ttl=ttl)

    def peers_list(self, ctx, mesh: str = None):
        """The peers of one mesh (default: the session's) or of every joined mesh, concurrently."""
        slug = mesh_from_ctx(ctx, mesh)
        if slug is not None and slug not in self.links.meshes:
            raise RpcError.of(NOT_FOUND, 'mesh_not_attached', 'mesh not attached: %s' % slug,
                              mesh=slug)
        slugs = [slug] if slug is not None else sorted(self.links.meshes)
        rosters = self.links.rosters(slugs)
        peers, unreachable = [], []
        for name in slugs:
            roster = rosters[name]
            if roster is None:
                unreachable.append(name)
                log.warning('ipc_peers_broker_failed', extra={'fields': {
                    'mesh': name, 'err': 'broker unreachable'}})
                continue
            peers.extend(dict(peer, mesh=name) for peer in roster if isinstance(peer, dict))
        if slugs and len(unreachable) == len(slugs):
            raise RpcError.of(UPSTREAM_ERROR, 'broker_unreachable', 'no broker answered',
                              detail='unreachable: %s' % ', '.join(unreachable),
                              unreachable=unreachable)
        return {'peers': peers, 'unreachable': unreachable}
