"""`peer_changed` events: what a peer shows (status, summary, groups, …) changed.

The wire has no event for a peer's status, summary, profile or groups (spec/wire.md §5.4):
the broker only says who joined and left. So the daemon compares each roster it reads (for
`peers.list`, `send`'s resolution, and every `roster_poll_interval` while someone listens
to events) with the one before, and publishes one event per peer whose fields differ.
Arrivals and departures are left to the broker's own `peer_joined` / `peer_left`.
"""
import logging

log = logging.getLogger(__name__)

FIELDS = ('displayName', 'status', 'summary', 'groups', 'profile', 'visible')


def _fields(peer):
    return {field: peer.get(field) for field in FIELDS}


class RosterWatch:
    """Compares rosters per mesh and tells `publish(kind, data)` what changed."""

    def __init__(self, publish):
        self.publish = publish
        self._last = {}     # slug -> {pubkey: fields}

    def saw(self, slug, peers):
        """A roster of `slug` was read: publish a `peer_changed` for each peer that differs
        from the previous read. The first read of a mesh is a baseline only."""
        current = {}
        for peer in peers:
            pubkey = peer.get('pubkey') if isinstance(peer, dict) else None
            if isinstance(pubkey, str) and pubkey and not peer.get('grace'):
                current[pubkey] = (peer, _fields(peer))
        previous = self._last.get(slug)
        self._last[slug] = {pubkey: fields for pubkey, (_peer, fields) in current.items()}
        if previous is None:
            return
        for pubkey, (peer, fields) in sorted(current.items()):
            before = previous.get(pubkey)
            if before is None:
                continue
            changes = {field: {'from': before[field], 'to': fields[field]}
                       for field in FIELDS if before[field] != fields[field]}
            if changes:
                self.publish('peer_changed', {
                    'mesh': slug, 'pubkey': pubkey, 'member_pubkey': peer.get('memberPubkey'),
                    'display_name': fields['displayName'], 'changes': changes})

    def forget(self, slug):
        """A mesh was detached: its next roster is a new baseline."""
        self._last.pop(slug, None)


class RosterPoll:
    """Reads every joined mesh's roster while events have a subscriber, so that changes
    nobody asked about still reach them: `subscribers()` counts listeners, `rosters(slugs)`
    reads (meshd/links.py), `meshes()` lists the joined slugs."""

    def __init__(self, subscribers, rosters, meshes):
        self.subscribers = subscribers
        self.rosters = rosters
        self.meshes = meshes

    def step(self):
        if self.subscribers() > 0:
            self.rosters(sorted(self.meshes()))
