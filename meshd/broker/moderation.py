"""The moderation verbs of admins (spec/wire.md §4.5, §8.4): kick, disconnect, ban, unban.

Only a member whose role is admin may use them; `kick` closes sessions 4001 and leaves
daemons (control-plane presences) alone, `disconnect` closes anything 1000, `ban` revokes
the member and closes every presence of it 4002.
"""
import datetime

from meshd import clock
from meshd.broker import protocol
from meshd.broker.models import Member, Presence
from meshd.broker.presence import ROLE_MEMBER

MAX_STALE_MS = 10 * 365 * 86400 * 1000


class ModerationVerbs(object):
    """Handlers `(entry, frame)` over the connection map `presences` and `store`;
    `remove(entry, code, reason)` ends a presence at once."""

    def __init__(self, presences, store, remove):
        self.presences = presences
        self.store = store
        self.remove = remove

    def handlers(self):
        return {'kick': self.kick, 'disconnect': self.disconnect, 'ban': self.ban,
                'unban': self.unban, 'list_bans': self.list_bans}

    def _select_targets(self, entry, frame):
        entries = self.presences.in_mesh(entry.mesh_id)
        if frame.get('all'):
            return [e for e in entries if e is not entry], ''
        stale = frame.get('stale')
        if protocol.is_finite_number(stale) and stale > 0:
            # Beyond ten years nothing is that stale; a larger number overflows a timedelta.
            cutoff = clock.utcnow() - datetime.timedelta(milliseconds=min(stale, MAX_STALE_MS))
            rows = Presence.stale_among([e.presence_id for e in entries], cutoff)
            return [e for e in entries if e.presence_id in rows], '_stale'
        target = frame.get('target')
        if isinstance(target, str) and target:
            return [e for e in entries if e.display_name == target
                    or e.member_pubkey == target or e.member_pubkey.startswith(target)], ''
        return [], ''

    def _kick_or_disconnect(self, entry, frame, verb):
        req_id = protocol.req_id(frame)
        if not Member.is_admin(entry.member_id):
            entry.send(protocol.error('forbidden', 'only owner or admin can %s' % verb,
                                      req_id=req_id))
            return
        targets, suffix = self._select_targets(entry, frame)
        affected, skipped = [], []
        for target in targets:
            name = target.display_name or target.presence_id
            if verb == 'kick' and target.role == ROLE_MEMBER:
                skipped.append(name)
                continue
            if verb == 'kick':
                self.remove(target, protocol.CLOSE_KICKED, 'kicked' + suffix)
            else:
                self.remove(target, protocol.CLOSE_NORMAL, 'disconnected' + suffix)
            affected.append(name)
        reply = {'type': verb + '_ack', 'kicked': affected, 'affected': affected}
        if verb == 'kick':
            reply['skipped_control_plane'] = skipped
        entry.send(protocol.with_req(reply, frame))

    def kick(self, entry, frame):
        self._kick_or_disconnect(entry, frame, 'kick')

    def disconnect(self, entry, frame):
        self._kick_or_disconnect(entry, frame, 'disconnect')

    def ban(self, entry, frame):
        req_id = protocol.req_id(frame)
        target = frame.get('target')
        if not isinstance(target, str) or not target:
            return entry.send(protocol.error('invalid', 'target required', req_id=req_id))
        if not Member.is_admin(entry.member_id):
            return entry.send(protocol.error('forbidden', 'only owner or admin can ban',
                                             req_id=req_id))
        members = Member.active_in(entry.mesh_id)
        found = ([m for m in members if m.display_name == target or m.peer_pubkey == target]
                 or [m for m in members if m.peer_pubkey.startswith(target)])
        if not found:
            return entry.send(protocol.error('not_found', 'peer "%s" not found' % target,
                                             req_id=req_id))
        member = found[0]
        if member.id == entry.member_id:
            return entry.send(protocol.error('invalid', 'cannot ban yourself', req_id=req_id))
        with self.store.writing():
            Member.revoke(member.id, clock.utcnow())
        for other in self.presences.in_mesh(entry.mesh_id):
            if other.member_id == member.id:
                self.remove(other, protocol.CLOSE_BANNED, protocol.REASON_BANNED)
        entry.send(protocol.with_req({'type': 'ban_ack', 'banned': member.display_name}, frame))

    def unban(self, entry, frame):
        req_id = protocol.req_id(frame)
        target = frame.get('target')
        if not isinstance(target, str) or not target:
            return entry.send(protocol.error('invalid', 'target required', req_id=req_id))
        if not Member.is_admin(entry.member_id):
            return entry.send(protocol.error('forbidden', 'only owner or admin can unban',
                                             req_id=req_id))
        member = next((m for m in Member.banned(entry.mesh_id)
                       if m.display_name == target or m.peer_pubkey == target), None)
        if member is None:
            return entry.send(protocol.error('not_found', 'no banned peer "%s"' % target,
                                             req_id=req_id))
        with self.store.writing():
            Member.unrevoke(member.id)
        entry.send(protocol.with_req({'type': 'unban_ack', 'unbanned': member.display_name},
                                     frame))

    def list_bans(self, entry, frame):
        bans = [{'name': m.display_name, 'pubkey': m.peer_pubkey,
                 'revokedAt': protocol.iso(m.revoked_at)} for m in Member.banned(entry.mesh_id)]
        entry.send(protocol.with_req({'type': 'list_bans_result', 'bans': bans}, frame))
