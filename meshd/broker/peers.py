"""The presence and profile verbs (spec/wire.md §4.3, §5.3): who is here and how they are.

list_peers, set_status, set_summary, set_visible, set_profile, set_stats, join_group and
leave_group. Group names and roles have the limits of a hello's groups.
"""
from meshd import clock
from meshd.broker import handshake, protocol
from meshd.broker.models import Presence, dumps, loads
from meshd.broker.presence import OFFLINE

_PROFILE_KEYS = ('avatar', 'title', 'bio', 'capabilities')


class PeerVerbs(object):
    """Handlers `(entry, frame)` over the connection map `presences` and `store`; `delivery`
    drains a presence whose status or groups changed; `broadcast_event` tells the mesh."""

    def __init__(self, presences, store, delivery, broadcast_event):
        self.presences = presences
        self.store = store
        self.delivery = delivery
        self.broadcast_event = broadcast_event

    def handlers(self):
        return {'list_peers': self.list_peers, 'set_status': self.set_status,
                'set_summary': self.set_summary, 'set_visible': self.set_visible,
                'set_profile': self.set_profile, 'set_stats': self.set_stats,
                'join_group': self.join_group, 'leave_group': self.leave_group}

    def list_peers(self, entry, frame):
        peers = []
        for row in Presence.roster(entry.mesh_id):
            live = self.presences.entries.get(row.id)
            if live is not None and not live.visible and live.member_id != entry.member_id:
                continue
            peer = {
                'pubkey': row.session_pubkey or row.peer_pubkey,
                'memberPubkey': row.peer_pubkey,
                'displayName': row.display_name or row.member_name,
                'status': live.status if live is not None else row.status,
                'summary': live.summary if live is not None else row.summary,
                'groups': live.groups if live is not None else loads(row.groups, []),
                'sessionId': row.session_id,
                'connectedAt': protocol.iso(row.connected_at),
                'cwd': live.cwd if live is not None else row.cwd,
                'peerRole': row.role,
            }
            if live is not None:
                for key, value in (('hostname', live.hostname), ('peerType', live.peer_type),
                                   ('channel', live.channel), ('model', live.model),
                                   ('stats', live.stats)):
                    if value is not None:
                        peer[key] = value
                peer['visible'] = live.visible
                if live.profile:
                    peer['profile'] = live.profile
                if 'presence' in entry.ext and live.lease == OFFLINE:
                    peer['grace'] = True    # meshd extension: gone, in its grace window
            peers.append(peer)
        entry.send(protocol.with_req({'type': 'peers_list', 'peers': peers}, frame))

    def _update_presence(self, entry, **fields):
        with self.store.writing():
            Presence.set_fields(entry.presence_id, **fields)

    def set_status(self, entry, frame):
        status = frame.get('status')
        if status not in protocol.STATUSES:
            return
        now = clock.utcnow()
        entry.status, entry.status_source, entry.status_updated_at = status, 'manual', now
        self._update_presence(entry, status=status, status_source='manual', status_updated_at=now)
        self.delivery.drain(entry)

    def set_summary(self, entry, frame):
        summary = frame.get('summary')
        if isinstance(summary, str):
            entry.summary = summary
            self._update_presence(entry, summary=summary)

    def _small_ack(self, entry, frame):
        req_id = protocol.req_id(frame)
        entry.send(protocol.ack(req_id or '', '', False, req_id=req_id))

    def set_visible(self, entry, frame):
        visible = frame.get('visible')
        if isinstance(visible, bool):
            entry.visible = visible
            self.broadcast_event(entry, 'peer_visible' if visible else 'peer_hidden',
                                  {'name': entry.display_name, 'pubkey': entry.pubkey},
                                  include_same_member=True)
        self._small_ack(entry, frame)

    def set_profile(self, entry, frame):
        for key in _PROFILE_KEYS:
            if key in frame:
                entry.profile[key] = frame[key]
        self._small_ack(entry, frame)

    def set_stats(self, entry, frame):
        if isinstance(frame.get('stats'), dict):
            entry.stats = frame['stats']

    def join_group(self, entry, frame):
        name, role = frame.get('name'), frame.get('role')
        # The limits of a hello's groups: every ancestor of a/b/c is a target, so a name of
        # thousands of levels cost seconds and hundreds of MB at every drain and fan-out.
        if not isinstance(name, str) or not 0 < len(name) <= handshake.MAX_NAME:
            return
        if (len(entry.groups) >= handshake.MAX_GROUPS
                and all(g['name'] != name for g in entry.groups)):
            return
        group = {'name': name}
        if isinstance(role, str) and len(role) <= handshake.MAX_NAME:
            group['role'] = role
        entry.groups = [g for g in entry.groups if g['name'] != name] + [group]
        self._update_presence(entry, groups=dumps(entry.groups))
        self.delivery.drain(entry)

    def leave_group(self, entry, frame):
        name = frame.get('name')
        entry.groups = [g for g in entry.groups if g['name'] != name]
        self._update_presence(entry, groups=dumps(entry.groups))
