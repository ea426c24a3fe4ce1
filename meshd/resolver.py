"""Who `to` is: a mesh and a key for `send` (spec/daemon.md §8.3, DESIGN.md 17).

Targets: `*`/`@all` and `@group` (multicast); a full 64-hex key; a unique hex prefix of 4–63
characters; a display name. A name or a prefix reaches a member — its member key, never its
daemon's control-plane session key — whose daemon is online (a control-plane row of the
roster) or offline (the address book), or a session by its own key or session name.
Matches are grouped by member: a name or prefix whose matches all belong to one member
resolves to that member's key, unless exactly one session matched by its own key or name and
the member itself did not. A row in its broker's grace window gives way to a live row.
"""
import re

from rpc.protocol import MESH_CHOICE, NOT_FOUND, RpcError

from meshd import crypto

_PREFIX = re.compile(r'^[0-9a-fA-F]{4,63}$')


class Resolution:
    """Where a send goes: mesh, target key, and what the roster and book said about it."""

    def __init__(self, mesh, target, is_dm, name=None, online=None, known=True):
        self.mesh = mesh
        self.target = target
        self.is_dm = is_dm
        self.name = name
        self.online = online
        self.known = known      # a roster or the address book has shown this key


class Candidate:
    """One way `to` can be read: a session (its own key or name) or a member."""

    def __init__(self, mesh, level, key, member, name, online, grace=False):
        self.mesh = mesh
        self.level = level          # 'session' or 'member'
        self.key = key
        self.member = member
        self.name = name
        self.online = online
        self.grace = grace

    def public(self):
        return {'display_name': self.name, 'pubkey': self.key, 'mesh': self.mesh,
                'kind': self.level, 'online': self.online}


class Resolver:
    """Reads the rosters of `links` (the LinkTable) and the address book of `directory`."""

    def __init__(self, links, directory, timings):
        self.links = links
        self.directory = directory
        self.timings = timings

    def fallback_mesh(self, session, explicit):
        """The mesh of a target that names none: the explicit one, the session's, or the
        only joined one."""
        meshes = self.links.meshes
        if explicit:
            if explicit not in meshes:
                raise RpcError.of(NOT_FOUND, 'mesh_not_attached',
                                  'mesh not attached: %s' % explicit, mesh=explicit)
            return explicit
        if session is not None and session.mesh in meshes:
            return session.mesh
        if len(meshes) == 1:
            return next(iter(meshes))
        attached = sorted(meshes)
        raise RpcError.of(MESH_CHOICE, 'mesh_required',
                          "daemon attached to %d meshes; pass 'mesh'" % len(attached),
                          attached=attached)

    def resolve(self, session, to, explicit_mesh):
        # Resolution may reuse a roster read moments ago (join and leave events forget it).
        max_age = self.timings['roster_cache_ttl']
        if to == '*' or to.startswith('@'):
            return Resolution(self.fallback_mesh(session, explicit_mesh), to, False)
        if crypto.is_hex64(to, any_case=True):
            return self._full_key(session, to.lower(), explicit_mesh, max_age)
        kind = 'prefix' if _PREFIX.match(to) else 'name'
        scope = [explicit_mesh] if explicit_mesh else sorted(self.links.meshes)
        rosters = self.links.rosters(scope, max_age)
        hits = [hit for slug in scope for hit in (
            _match(c, to, kind) for c in self._candidates(slug, rosters.get(slug))) if hit]
        if any(not c.grace for c in hits):
            hits = [c for c in hits if not c.grace]       # a live row wins over a leaving one
        if not hits:
            unreachable = [slug for slug in scope if rosters.get(slug) is None]
            where = ('on mesh "%s"' % explicit_mesh) if explicit_mesh else 'on any joined mesh'
            raise RpcError.of(NOT_FOUND, 'peer_not_found', 'No peer matches "%s" %s' % (to, where),
                              to=to, meshes=scope, unreachable=unreachable)
        candidates = [c.public() for c in hits]
        meshes = sorted({c.mesh for c in hits})
        if len(meshes) > 1:
            raise RpcError.of(MESH_CHOICE, 'mesh_required',
                              '"%s" matches peers on %d meshes — pick one with mesh'
                              % (to, len(meshes)), to=to, meshes=meshes, candidates=candidates)
        members = {c.member for c in hits}
        if len(members) > 1:
            raise RpcError.of(MESH_CHOICE, 'ambiguous', 'Ambiguous %s "%s" — matches %d peers.'
                              % (kind, to, len(members)), to=to, kind=kind, mesh=meshes[0],
                              candidates=candidates)
        if len(hits) == 1 and hits[0].level == 'session':
            chosen = hits[0]     # one session, by its own key or name, and not its member
            return Resolution(chosen.mesh, chosen.key, True, chosen.name, chosen.online)
        member = members.pop()
        peers = rosters.get(meshes[0])
        return Resolution(meshes[0], member, True, self._member_name(meshes[0], member, peers),
                          _online(peers, member))

    def _full_key(self, session, target, explicit_mesh, max_age):
        if explicit_mesh:
            peers = self.links.rosters([explicit_mesh], max_age)[explicit_mesh]
            return Resolution(explicit_mesh, target, True, _name_for(peers, target),
                              _online(peers, target),
                              _shown(peers, target) or self.directory.knows(target,
                                                                             explicit_mesh))
        rosters = self.links.rosters(sorted(self.links.meshes), max_age)
        hits = [slug for slug, peers in rosters.items() if _shown(peers, target)]
        if not hits:
            hits = [slug for slug in sorted(self.links.meshes)
                    if self.directory.knows(target, slug)]
        if len(hits) > 1:
            raise RpcError.of(MESH_CHOICE, 'mesh_required',
                              '"%s" matches peers on %d meshes — pick one with mesh'
                              % (target, len(hits)), to=target, meshes=hits, candidates=[])
        slug = hits[0] if hits else self.fallback_mesh(session, None)
        peers = rosters.get(slug)
        return Resolution(slug, target, True, _name_for(peers, target)
                          or self.directory.sender(slug, target)[0],
                          _online(peers, target), known=bool(hits))

    def _candidates(self, slug, peers):
        """Every session and member of mesh `slug` that `to` could name."""
        found, live_members = [], set()
        for peer in peers or []:
            pubkey = str(peer.get('pubkey', '')).lower()
            member = str(peer.get('memberPubkey') or pubkey).lower()
            grace = bool(peer.get('grace'))
            if _is_control_plane(peer) or pubkey == member:
                live_members.add(member)
                found.append(Candidate(slug, 'member', member, member,
                                       peer.get('displayName'), not grace, grace))
            else:
                found.append(Candidate(slug, 'session', pubkey, member, peer.get('displayName'),
                                       not grace, grace))
        for entry in self.directory.members(slug):
            if entry.pubkey not in live_members:
                found.append(Candidate(slug, 'member', entry.pubkey, entry.pubkey, entry.name,
                                       False))
        return found

    def _member_name(self, slug, member, peers):
        for peer in peers or []:
            if str(peer.get('pubkey', '')).lower() == member:
                return peer.get('displayName')
        return self.directory.sender(slug, member)[0]


def _match(candidate, to, kind):
    """`candidate` as `to` reaches it: itself, its member (a session whose member key has
    the prefix), or None."""
    if kind == 'name':
        return candidate if str(candidate.name or '').lower() == to.lower() else None
    needle = to.lower()
    if candidate.key.startswith(needle):
        return candidate
    if candidate.member.startswith(needle):
        return Candidate(candidate.mesh, 'member', candidate.member, candidate.member, None,
                         candidate.online, candidate.grace)
    return None


def _is_control_plane(peer):
    return peer.get('peerRole') == 'control-plane'


def _shown(peers, target):
    return any(str(p.get('pubkey', '')).lower() == target
               or str(p.get('memberPubkey', '')).lower() == target for p in peers or [])


def _online(peers, target):
    """Whether a presence that will take a DM to `target` is connected; None if unknown.

    A session row counts when its key or its member's key is the target. A control-plane
    row counts only as its member's own key: a DM to a member key reaches that member's
    daemon (meshd stores it in the member's inbox), so the daemon being connected means
    the recipient is online. Rows in their grace window are not online.
    """
    if peers is None:
        return None
    for peer in peers:
        if peer.get('grace'):
            continue
        member = str(peer.get('memberPubkey', '')).lower()
        if _is_control_plane(peer):
            if member == target:
                return True
        elif str(peer.get('pubkey', '')).lower() == target or member == target:
            return True
    return False


def _name_for(peers, target):
    for peer in peers or []:
        if str(peer.get('pubkey', '')).lower() == target:
            return peer.get('displayName')
    return None
