"""The life of a presence: bound by a hello, acked, offline, in grace, evicted or removed.

spec/wire.md §7.6 and the fixes of §10: an entry is bound to its socket before anything
yields, acked only once its presence id is bound, and taken out of the connection map
before any database call that could yield while a reattach binds it again. A socket that
closes leaves its entry offline-leased for the grace window, its claims released and
re-pushed; a peer sees `peer_left` only when the grace window ends without a return. The
"no yield between X and Y" comments below hold for the code exactly as it stands.
"""
import logging

from meshd import clock
from meshd.broker import protocol
from meshd.broker.models import PeerState, Presence, dumps, loads
from meshd.broker.presence import (OFFLINE, ROLE_MEMBER, ROLE_SESSION, Entry, extensions,
                                   normalise_groups)

log = logging.getLogger(__name__)

EXT_VERSION = 1
# meshd extensions this broker speaks (docs/wire-extensions.md), announced in hello_ack.
BROKER_EXTENSIONS = ('undelivered', 'presence', 'grants', 'message_status')
_STATS_KEYS = ('messagesIn', 'messagesOut', 'toolCalls', 'errors')


class Lifecycle(object):
    """Binds, acks and ends the presences of the connection map `presences`.

    `store` holds the presence rows, `delivery` releases and re-pushes claims and drains,
    `notices` tells a returning sender of its undelivered DMs, `hooks` applies hook statuses
    that arrived early, `supervisor` runs the grace timers, `timings` holds the grace
    window; `fault_hooks` are the tests' seams.
    """

    def __init__(self, presences, store, delivery, notices, hooks, supervisor, timings):
        self.presences = presences
        self.store = store
        self.delivery = delivery
        self.notices = notices
        self.hooks = hooks
        self.supervisor = supervisor
        self.timings = timings
        self.stopping = supervisor.stopping
        # Test seams: 'before_hello_ack' is called with the entry right before hello_ack;
        # 'before_bind' with the presence a hello is about to reattach.
        self.fault_hooks = {}

    # ------------------------------------------------------------------ hello

    def bind(self, conn, frame, kind, mesh, member, reattach):
        try:
            self._bind_and_ack(conn, frame, kind, mesh, member, reattach)
        except Exception:
            entry = conn.entry
            if entry is not None and not entry.ready:
                # Bound but never acked: unbind it, or it stays listed and unreachable.
                self._drop_unacked(conn, entry, is_new=entry is not reattach)
            raise

    def _bind_and_ack(self, conn, frame, kind, mesh, member, reattach):
        ws = conn.ws
        now = clock.utcnow()
        peer_state = None
        if kind == 'hello':
            peer_state = PeerState.of(mesh.id, member.id)
        display_name = frame.get('displayName') if isinstance(frame.get('displayName'), str) and \
            frame.get('displayName') else None
        # sessionId de-dup: any other entry with this sessionId is replaced (no peer_left).
        for other in self.presences.in_mesh(mesh.id):
            if other is not reattach and other.session_id == frame['sessionId']:
                self.remove(other, protocol.CLOSE_NORMAL, protocol.REASON_REPLACED)
        hook = self.fault_hooks.get('before_bind')
        if hook is not None and reattach is not None:
            hook(reattach)
        # The reads above yield on PostgreSQL: the presence to reattach may have been evicted
        # meanwhile, and then this hello starts a new one.
        is_new = reattach is None or reattach.evicting or not self.presences.contains(reattach)
        if not is_new and reattach.grace_timer is not None:
            # Claimed before anything below yields, so its grace timer cannot evict it now.
            reattach.grace_timer.kill(block=False)
            reattach.grace_timer = None
        if is_new:
            entry = Entry(protocol.new_id(), mesh.id, member,
                          ROLE_SESSION if kind == 'session_hello' else ROLE_MEMBER,
                          frame['sessionId'], frame.get('sessionPubkey') or None,
                          display_name or member.display_name, frame)
            if 'groups' in frame and isinstance(frame.get('groups'), list):
                entry.groups = normalise_groups(frame['groups'])
            elif peer_state is not None:
                entry.groups = normalise_groups(loads(peer_state.groups, []))
            else:
                entry.groups = normalise_groups(loads(member.default_groups, []))
            if peer_state is not None:
                entry.visible = bool(peer_state.visible)
                entry.profile = loads(peer_state.profile, {}) or {}
            with self.store.writing():
                Presence.open(
                    id=entry.presence_id, member_id=member.id, mesh_id=mesh.id,
                    session_id=entry.session_id, session_pubkey=entry.session_pubkey,
                    display_name=entry.display_name, pid=frame['pid'], cwd=frame['cwd'],
                    status='idle', status_source='jsonl', status_updated_at=now, summary=None,
                    groups=dumps(entry.groups), role=entry.role, connected_at=now,
                    last_ping_at=now)
            self.presences.add(entry)
            # Bound at once: from here an exception still ends in this socket's close path.
            entry.attach(ws)
            conn.entry = entry
            self.hooks.apply_pending(entry, now)
        else:
            entry = reattach
            old_ws = entry.ws
            if old_ws is not None and old_ws is not ws and old_ws.is_open:
                old_ws.close_with(protocol.CLOSE_NORMAL, protocol.REASON_REPLACED)
            if old_ws is not None and old_ws is not ws:
                # The replaced socket's claims die with it (§7.10 rule 2).
                entry.detach()
                self.delivery.release(entry)
            entry.cwd = frame['cwd']
            entry.ext = extensions(frame)
            if display_name:
                entry.display_name = display_name
            entry.attach(ws)
            conn.entry = entry
            with self.store.writing():
                Presence.reattach(entry.presence_id, now, frame['cwd'], entry.display_name)
        hook = self.fault_hooks.get('before_hello_ack')
        if hook is not None:
            hook(entry)
        if not ws.is_open:
            # D2: the socket died during the hello; nothing may stay listed as online.
            self._drop_unacked(conn, entry, is_new)
            log.info('socket closed during %s; presence %s dropped', kind, entry.presence_id)
            return
        if entry.grace_timer is not None:
            entry.grace_timer.kill(block=False)
            entry.grace_timer = None
        entry.grace_token = None
        ws.send_json(self._hello_ack(frame, kind, mesh, member, entry, peer_state, is_new))
        # Only now may other greenlets push to it (events, drains): hello_ack comes first.
        entry.ready = True
        log.info('%s accepted: presence %s (%s)', kind, entry.presence_id,
                 'new' if is_new else 'reattached')
        if is_new:
            data = {'name': entry.display_name, 'pubkey': entry.pubkey, 'groups': entry.groups}
            if kind == 'hello' and peer_state is not None:
                data['lastSeenAt'] = protocol.iso(peer_state.last_seen_at)
                data['summary'] = peer_state.last_summary
                event = 'peer_returned'
            else:
                event = 'peer_joined'
            same_member_too = kind == 'session_hello'
            self.broadcast_event(entry, event, data, include_same_member=same_member_too)
        self.delivery.drain(entry)
        self.notices.notify(entry)

    def _drop_unacked(self, conn, entry, is_new):
        """Unbind an entry whose hello_ack was never written: a new one is removed, a
        reattached one (online before this hello) gets a fresh grace window."""
        conn.entry = None
        entry.detach()
        if is_new:
            self.presences.remove(entry)
            self._mark_disconnected(entry)
        elif entry.grace_timer is None or entry.grace_timer.dead:
            self.start_grace(entry)

    def _hello_ack(self, frame, kind, mesh, member, entry, peer_state, is_new):
        ack = {'type': 'hello_ack', 'presenceId': entry.presence_id,
               'memberDisplayName': entry.display_name}
        if kind == 'hello' or is_new:
            ack['memberProfile'] = {'roleTag': member.role_tag,
                                    'groups': loads(member.default_groups, []),
                                    'messageMode': member.message_mode or 'push'}
        ack['meshPolicy'] = {'selfEditable': loads(mesh.self_editable,
                                                         dict(protocol.DEFAULT_SELF_EDITABLE))}
        if kind == 'hello' and peer_state is not None:
            ack['restored'] = True
            ack['lastSummary'] = peer_state.last_summary
            ack['lastSeenAt'] = protocol.iso(peer_state.last_seen_at)
            if 'groups' not in frame:
                ack['restoredGroups'] = loads(peer_state.groups, [])
            stats = loads(peer_state.cumulative_stats, {})
            ack['restoredStats'] = {k: stats.get(k, 0) for k in _STATS_KEYS}
        if kind == 'hello':
            ack['services'] = []
        if isinstance(frame.get('meshdExt'), dict):
            # Only to a client that announced meshd extensions (a claudemesh one never sees it).
            ack['meshdExt'] = {'v': EXT_VERSION, 'features': list(BROKER_EXTENSIONS),
                               'dmTtlSeconds': int(self.delivery.dm_ttl)}
        return ack

    # ------------------------------------------------------------------ after the hello

    def broadcast_event(self, source, event, data, include_same_member=False):
        frame = protocol.system_push(event, data, source.mesh_id)
        # meshd extension `presence`: whose session it is, for peers that announced it.
        detailed = dict(frame, eventData=dict(data, memberPubkey=source.member_pubkey))
        for other in self.presences.live(source.mesh_id):
            if other is source:
                continue
            if not include_same_member and other.member_id == source.member_id:
                continue
            if not other.send(detailed if 'presence' in other.ext else frame):
                self.on_dead(other)

    def goodbye(self, entry, frame):
        """meshd extension `presence`: the client ends this presence on purpose (a session
        whose process exited), so it leaves now instead of after its grace window."""
        if 'presence' not in entry.ext:
            return
        if entry.role == ROLE_MEMBER:
            self._save_peer_state(entry)
        self.remove(entry, protocol.CLOSE_NORMAL, 'goodbye')
        self.broadcast_event(entry, 'peer_left', {'name': entry.display_name,
                                                  'pubkey': entry.pubkey},
                             include_same_member=entry.role == ROLE_SESSION)

    def go_offline(self, entry, ws):
        """Close path: the entry's socket is gone; keep it offline-leased for the grace window."""
        if not self.presences.contains(entry) or entry.ws is not ws:
            return      # a newer socket took over, or the entry was removed already
        entry.detach()
        try:
            if entry.role == ROLE_MEMBER:
                self._save_peer_state(entry)
        except Exception:
            # A failed save must not skip the release and the grace window: the presence
            # would stay listed for good (review finding).
            log.exception('saving peer state of %s failed', entry.presence_id)
        self.delivery.release(entry)
        self.start_grace(entry)
        log.info('presence %s offline (grace %ss)', entry.presence_id, self.timings['broker_grace'])

    def start_grace(self, entry):
        token = object()
        entry.grace_token = token
        if not self.stopping.is_set():
            entry.grace_timer = self.supervisor.spawn_later(self.timings['broker_grace'],
                                                            'grace', self.evict, entry, token)

    def on_dead(self, entry):
        """A write to the entry's socket failed: terminate it and run the close path now."""
        ws = entry.ws
        if ws is not None:
            ws.terminate()
            self.go_offline(entry, ws)

    def evict(self, entry, token):
        """The end of a grace window: remove the entry and tell the mesh `peer_left`."""
        if (self.stopping.is_set() or entry.lease != OFFLINE or entry.grace_token is not token
                or not self.presences.contains(entry)):
            return
        entry.evicting = True
        # Remove before any database call: a query yields (PostgreSQL), and a reattach in
        # that gap would bind a socket to an entry about to be evicted (review finding).
        self.presences.remove(entry)
        entry.grace_timer = None
        with self.store.connection():
            self._mark_disconnected(entry)
            log.info('presence %s evicted after grace', entry.presence_id)
            self.broadcast_event(entry, 'peer_left', {'name': entry.display_name,
                                                      'pubkey': entry.pubkey})

    def remove(self, entry, code, reason, error_frame=None):
        """Remove an entry at once (kick, ban, disconnect, replacement, revocation)."""
        if not self.presences.remove(entry):
            return
        ws = entry.ws
        entry.detach()
        if entry.grace_timer is not None:
            entry.grace_timer.kill(block=False)
            entry.grace_timer = None
        if ws is not None:
            if error_frame is not None:
                ws.send_json(error_frame)
            ws.close_with(code, reason)
        self._mark_disconnected(entry)
        self.delivery.release(entry)
        log.info('presence %s removed (%d %s)', entry.presence_id, code, reason)

    def _mark_disconnected(self, entry):
        with self.store.writing():
            Presence.disconnect(entry.presence_id, clock.utcnow())

    def _save_peer_state(self, entry):
        with self.store.writing():
            PeerState.remember(entry.mesh_id, entry.member_id, groups=dumps(entry.groups),
                           profile=dumps(entry.profile), visible=entry.visible,
                           last_summary=entry.summary, last_display_name=entry.display_name,
                           cumulative_stats=dumps(entry.stats or {}),
                           last_seen_at=clock.utcnow())
