"""The connection map: one entry per presence, online or offline-leased (spec/wire.md §7.6, §9.1).

Entries live in memory only; the `presence` table mirrors what peers_list reads. An entry holds
its socket (None while offline), a socket generation number (so that a late close event or grace
timer for an older socket is ignored) and the identity and profile fields of the hello.
"""
import itertools

ROLE_MEMBER = 'control-plane'
ROLE_SESSION = 'session'
ONLINE = 'online'
OFFLINE = 'offline'

_generations = itertools.count(1)


def normalise_groups(value):
    """Keep the well-formed `{name, role?}` items of a hello's or join's groups list."""
    groups = []
    if not isinstance(value, list):
        return groups
    for item in value:
        if isinstance(item, dict) and isinstance(item.get('name'), str) and item['name']:
            group = {'name': item['name']}
            if isinstance(item.get('role'), str):
                group['role'] = item['role']
            groups.append(group)
    return groups


def extensions(hello):
    """The meshd extensions a hello announced (`meshdExt.features`), as a frozenset."""
    ext = hello.get('meshdExt')
    features = ext.get('features') if isinstance(ext, dict) else None
    if not isinstance(features, list):
        return frozenset()
    return frozenset(f for f in features if isinstance(f, str))


def group_targets(groups):
    """`@` targets an entry matches: each group and each of its ancestor paths (a/b/c → @a/b, @a)."""
    targets = set()
    for group in groups:
        parts = group['name'].split('/')
        for i in range(1, len(parts) + 1):
            targets.add('@' + '/'.join(parts[:i]))
    return targets


class Entry(object):
    """One presence of the connection map."""

    def __init__(self, presence_id, mesh_id, member, role, session_id, session_pubkey,
                 display_name, hello):
        self.presence_id = presence_id
        self.mesh_id = mesh_id
        self.member_id = member.id
        self.member_pubkey = member.peer_pubkey
        self.role = role
        self.session_id = session_id
        self.session_pubkey = session_pubkey or None
        self.display_name = display_name
        self.cwd = hello.get('cwd')
        self.pid = hello.get('pid')
        self.hostname = hello.get('hostname') if isinstance(hello.get('hostname'), str) else None
        self.peer_type = hello.get('peerType') if isinstance(hello.get('peerType'), str) else None
        self.channel = hello.get('channel') if isinstance(hello.get('channel'), str) else None
        self.model = hello.get('model') if isinstance(hello.get('model'), str) else None
        self.groups = []
        self.visible = True
        self.profile = {}
        self.stats = None
        self.status = 'idle'
        self.status_source = 'jsonl'
        self.status_updated_at = None
        self.summary = None
        self.ws = None
        self.generation = 0
        self.lease = OFFLINE
        self.grace_timer = None
        self.grace_token = None
        self.evicting = False
        self.ready = False
        self.drain_requested = False    # see Delivery.request_drain
        self.drainer = None
        self.ext = extensions(hello)    # meshd extensions the client announced
        self.notices_sent = set()       # undelivered notices written on this socket

    @property
    def pubkey(self):
        """The key peers see and DMs target: the session key, else the member key."""
        return self.session_pubkey or self.member_pubkey

    @property
    def is_live(self):
        """Online, acked and with an open socket: the only state in which anything is pushed."""
        return self.lease == ONLINE and self.ready and self.ws is not None and self.ws.is_open

    def keys(self):
        """Every key that addresses this entry."""
        return {k for k in (self.member_pubkey, self.session_pubkey) if k}

    def attach(self, ws):
        """Bind a socket and go online; returns the new generation."""
        self.ws = ws
        self.notices_sent = set()
        self.lease = ONLINE
        self.ready = False      # until hello_ack is written on this socket
        self.generation = next(_generations)
        return self.generation

    def detach(self):
        """Go offline-leased (the socket is gone)."""
        self.ws = None
        self.lease = OFFLINE
        self.ready = False

    def send(self, frame):
        """Write a frame if the entry is live; False otherwise or when the write fails."""
        ws = self.ws
        if ws is None or self.lease != ONLINE:
            return False
        return ws.send_json(frame)


class ConnectionMap(object):
    """The connection map (spec/wire.md §7.6): presence id → Entry, indexed by mesh."""

    def __init__(self):
        self.entries = {}
        self._by_mesh = {}

    def add(self, entry):
        self.entries[entry.presence_id] = entry
        self._by_mesh.setdefault(entry.mesh_id, set()).add(entry.presence_id)

    def remove(self, entry):
        """Remove an entry; True when it was present."""
        if self.entries.get(entry.presence_id) is not entry:
            return False
        del self.entries[entry.presence_id]
        ids = self._by_mesh.get(entry.mesh_id)
        if ids is not None:
            ids.discard(entry.presence_id)
            if not ids:
                del self._by_mesh[entry.mesh_id]
        return True

    def contains(self, entry):
        return self.entries.get(entry.presence_id) is entry

    def in_mesh(self, mesh_id):
        """Entries of a mesh (online and offline-leased), oldest presence first."""
        ids = self._by_mesh.get(mesh_id, ())
        return [self.entries[i] for i in sorted(ids, key=lambda i: self.entries[i].generation)]

    def live(self, mesh_id=None):
        """Online entries with an open socket, in one mesh or everywhere."""
        source = self.in_mesh(mesh_id) if mesh_id is not None else list(self.entries.values())
        return [e for e in source if e.is_live]

    def all(self):
        return list(self.entries.values())
