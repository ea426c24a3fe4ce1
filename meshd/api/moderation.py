"""members.* (an admin's kick, disconnect, ban, unban, bans) and grants.* (a member's own).

The moderation verbs are claudemesh's (spec/wire.md §4.5): the broker decides who may use
them and says `forbidden` otherwise. Grants are the recipient's rules of spec/wire.md §8.3,
which the broker enforces on delivery; the protocol has no verb for a member to set them,
so they travel in meshd's `grants` extension (docs/wire-extensions.md) and a claudemesh
broker answers `unsupported_by_broker`.
"""
from rpc.protocol import invalid_params

from meshd import broker_calls as calls

GRANTS_FEATURE = 'grants'
CAPABILITY_WORDS = 16


def _target(target):
    if not isinstance(target, str) or not target.strip():
        raise invalid_params("missing 'target' (a name, a key or a key prefix)")
    return target.strip()


class ModerationMethods:
    """Admin verbs and grants over `routes` (meshd/api/routing.py); `resolver` turns a
    peer's name or key prefix into its member key (meshd/resolver.py); `directory` names
    the keys of a grants list (meshd/directory.py)."""

    def __init__(self, routes, resolver, directory):
        self.routes = routes
        self.resolver = resolver
        self.directory = directory

    def handlers(self):
        optional = {'session': 'optional'}
        return [
            ('members.kick', self.members_kick,
             dict(optional, result='{affected, skipped_control_plane, mesh}')),
            ('members.disconnect', self.members_disconnect,
             dict(optional, result='{affected, mesh}')),
            ('members.ban', self.members_ban, dict(optional, result='{banned, mesh}')),
            ('members.unban', self.members_unban, dict(optional, result='{unbanned, mesh}')),
            ('members.bans', self.members_bans, dict(optional, result='{bans:[…], unreachable}')),
            ('grants.list', self.grants_list, dict(optional,
                                                   result='{grants:[…], defaults, mesh}')),
            ('grants.set', self.grants_set,
             dict(optional, result='{ok, peer, name, capabilities, mesh}')),
            ('grants.block', self.grants_block,
             dict(optional, result='{ok, peer, name, capabilities, mesh}')),
            ('grants.revoke', self.grants_revoke,
             dict(optional, result='{ok, peer, name, capabilities, mesh}')),
        ]

    # -- moderation ------------------------------------------------------------------------

    def _close_verb(self, ctx, verb, target, stale_ms, all, mesh):
        chosen = [bool(all), stale_ms is not None, target is not None]
        if sum(chosen) != 1:
            raise invalid_params("pass exactly one of 'target', 'stale_ms' or 'all'")
        frame = {'type': verb}
        if all:
            frame['all'] = True
        elif stale_ms is not None:
            if stale_ms <= 0:
                raise invalid_params("'stale_ms' must be a positive number of milliseconds")
            frame['stale'] = stale_ms
        else:
            frame['target'] = _target(target)
        slug = self.routes.one(ctx, mesh)
        reply = calls.call(self.routes.link(ctx, slug), slug, frame)
        affected = reply.get('affected', reply.get('kicked'))
        result = {'affected': affected if isinstance(affected, list) else [], 'mesh': slug}
        if verb == 'kick':
            skipped = reply.get('skipped_control_plane')
            result['skipped_control_plane'] = skipped if isinstance(skipped, list) else []
        return result

    def members_kick(self, ctx, target: str = None, stale_ms: int = None, all: bool = False,  # noqa: A002
                     mesh: str = None):
        """Close sessions of the mesh (admins only); members' daemons are left connected."""
        return self._close_verb(ctx, 'kick', target, stale_ms, all, mesh)

    def members_disconnect(self, ctx, target: str = None, stale_ms: int = None,
                           all: bool = False, mesh: str = None):  # noqa: A002
        """Close connections of the mesh, daemons included (admins only); they may reconnect."""
        return self._close_verb(ctx, 'disconnect', target, stale_ms, all, mesh)

    def members_ban(self, ctx, target: str = None, mesh: str = None):
        """Revoke a member and close all its connections (admins only)."""
        slug = self.routes.one(ctx, mesh)
        reply = calls.call(self.routes.link(ctx, slug), slug,
                           {'type': 'ban', 'target': _target(target)})
        return {'banned': reply.get('banned'), 'mesh': slug}

    def members_unban(self, ctx, target: str = None, mesh: str = None):
        """Let a banned member back in (admins only)."""
        slug = self.routes.one(ctx, mesh)
        reply = calls.call(self.routes.link(ctx, slug), slug,
                           {'type': 'unban', 'target': _target(target)})
        return {'unbanned': reply.get('unbanned'), 'mesh': slug}

    def members_bans(self, ctx, mesh: str = None):
        """The banned members of the mesh (default: the session's, else every joined mesh)."""
        def bans(link, slug):
            rows = calls.call(link, slug, {'type': 'list_bans'}).get('bans')
            return [row for row in rows or () if isinstance(row, dict)]
        rows, unreachable = self.routes.read(ctx, self.routes.many(ctx, mesh), bans)
        return {'bans': [dict(row, mesh=slug) for slug, found in rows.items() for row in found],
                'unreachable': unreachable}

    # -- grants ----------------------------------------------------------------------------

    def _grants_call(self, ctx, mesh, frame):
        slug = self.routes.one(ctx, mesh)
        link = self.routes.link(ctx, slug)
        calls.require(link, slug, GRANTS_FEATURE)
        return slug, calls.call(link, slug, frame)

    def grants_list(self, ctx, mesh: str = None):
        """Your member's grants: which peers may reach you, and how."""
        slug, reply = self._grants_call(ctx, mesh, {'type': 'meshd_grants_get'})
        grants = reply.get('grants') if isinstance(reply.get('grants'), dict) else {}
        rows = [{'peer': peer, 'name': self.directory.sender(slug, peer)[0],
                 'capabilities': caps, 'blocked': caps == []}
                for peer, caps in sorted(grants.items()) if isinstance(caps, list)]
        return {'grants': rows, 'defaults': reply.get('defaults') or [], 'mesh': slug}

    def _set(self, ctx, peer, capabilities, mesh):
        if not isinstance(peer, str) or not peer.strip():
            raise invalid_params("missing 'peer' (a name, a key prefix or a key)")
        slug = self.routes.one(ctx, mesh)
        # The broker first: resolving a name against a broker that is away or cannot take
        # grants would answer with the wrong error.
        calls.require(self.routes.link(ctx, slug), slug, GRANTS_FEATURE)
        resolution = self.resolver.resolve(ctx.session, peer.strip(), slug)
        if not resolution.is_dm:
            raise invalid_params("'peer' must name one peer, not a group or everyone")
        _, reply = self._grants_call(ctx, slug, {'type': 'meshd_grants_set',
                                                 'peer': resolution.target,
                                                 'capabilities': capabilities})
        grants = reply.get('grants') if isinstance(reply.get('grants'), dict) else {}
        now = grants.get(resolution.target, reply.get('defaults') or [])
        return {'ok': True, 'peer': resolution.target, 'name': resolution.name,
                'capabilities': now, 'mesh': slug}

    def grants_set(self, ctx, peer: str = None, capabilities: list = None, mesh: str = None):
        """Say what a peer may do to you: read, dm, broadcast, state-read ([] blocks)."""
        if capabilities is None:
            raise invalid_params("missing 'capabilities' (string[]: read, dm, broadcast, "
                                 "state-read)")
        if len(capabilities) > CAPABILITY_WORDS or not all(
                isinstance(c, str) and c for c in capabilities):
            raise invalid_params("'capabilities' must be at most %d capability names"
                                 % CAPABILITY_WORDS)
        return self._set(ctx, peer, capabilities, mesh)

    def grants_block(self, ctx, peer: str = None, mesh: str = None):
        """Block a peer: its DMs to you fail at the sender, its broadcasts skip you."""
        return self._set(ctx, peer, [], mesh)

    def grants_revoke(self, ctx, peer: str = None, mesh: str = None):
        """Drop your grant for a peer: it gets the defaults again."""
        return self._set(ctx, peer, None, mesh)

