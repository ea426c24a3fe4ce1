"""The two kinds of broker link: one member link per mesh, one session link per session.

Both speak spec/wire.md §3: the member link says `hello` with the daemon's stable session
id (DESIGN.md 16); a session link says `session_hello` with a parent attestation signed
fresh on every connect. Pushes go to the daemon's Inbound after the self-echo filters of
spec/daemon.md §5.2 and §5.3. Each announces the meshd extensions it speaks (meshdExt,
docs/wire-extensions.md); a claudemesh broker ignores the field.
"""
import hashlib
import logging
import os
import socket
import sys
import time

from storage.models import Outbox

from meshd import clock, crypto, fingerprint
from meshd.greenlets import LOG
from meshd.wslink import Link

log = logging.getLogger(__name__)

EXT_VERSION = 1
# meshd extensions this daemon speaks, announced in every hello.
DAEMON_EXTENSIONS = ('undelivered', 'presence')


def stable_session_id(member_pubkey, host_id=None):
    """`daemon-` + 16 hex of sha256(host_id ‖ 0x00 ‖ member pubkey): stable across restarts."""
    host_id = fingerprint.host_id() if host_id is None else host_id
    digest = hashlib.sha256(host_id.encode() + b'\x00' + member_pubkey.encode()).hexdigest()
    return 'daemon-' + digest[:16]


def _meshd_ext():
    return {'v': EXT_VERSION, 'features': list(DAEMON_EXTENSIONS)}


class MemberLink(Link):
    """The daemon's control-plane socket for one mesh (`hello`, role control-plane).

    `inbound` stores pushes, `publish(kind, data)` tells event subscribers about the link,
    and `store` records the broker's notices of undelivered DMs in the outbox.
    """

    kind = 'member'
    log_prefix = 'broker_'

    def __init__(self, mesh, timings, supervisor, inbound, publish, store, on_open=None,
                 on_roster=None):
        super().__init__(mesh, mesh['brokerUrl'], timings, supervisor, self._opened)
        self.inbound = inbound
        self.publish = publish
        self.store = store
        self._when_open = on_open
        self.on_roster = on_roster      # (slug, peers): what each roster read showed
        self.session_id = stable_session_id(mesh['pubkey'])
        self._roster = None
        self._roster_at = 0.0

    @property
    def pubkey(self):
        return self.mesh['pubkey']

    def _opened(self):
        if self._when_open is not None:
            self._when_open()
        # Learn who is on the mesh now (the address book), without holding up the reader.
        self.supervisor.spawn('roster:%s' % self.name, self.list_peers, on_crash=LOG)

    def on_first_connect_failed(self, error):
        # Plain text on stderr, as spec/daemon.md §1.6 step 10 has it; the link keeps trying.
        sys.stderr.write('broker connect failed for %s: %s\n' % (self.name, error))
        sys.stderr.flush()

    def build_hello(self):
        mesh = self.mesh
        timestamp = clock.now_ms()
        hello = {'type': 'hello', 'meshId': mesh['meshId'], 'memberId': mesh['memberId'],
                 'pubkey': mesh['pubkey']}
        if mesh.get('displayName'):
            hello['displayName'] = mesh['displayName']
        hello.update({
            'sessionId': self.session_id, 'pid': os.getpid(), 'cwd': os.getcwd(),
            'hostname': socket.gethostname(), 'peerType': 'ai', 'channel': 'claudemesh-daemon',
            'meshdExt': _meshd_ext(), 'timestamp': timestamp,
            'signature': crypto.sign_hex(mesh['secretKey'], crypto.member_hello_text(
                mesh['meshId'], mesh['memberId'], mesh['pubkey'], timestamp))})
        return hello

    def on_status(self, status):
        log.info('broker_status', extra={'fields': {'status': status, 'mesh': self.name}})
        self.publish('broker_status', {'mesh': self.name, 'status': status})

    def on_push(self, frame):
        sender_member = (frame.get('senderMemberPubkey') or '').lower()
        if sender_member and sender_member == self.pubkey.lower():
            return  # our own send echoed on the member socket (1.34.9)
        self.inbound.handle_push(self, frame, session_secret=None)

    def on_undelivered(self, frame):
        """The broker gave up on one of our DMs (meshd extension): the outbox row becomes
        `undelivered` with a readable reason, then the notice is acked so it stops."""
        message_id = frame.get('messageId')
        cmid = frame.get('clientMessageId')
        if not isinstance(message_id, str) or not message_id:
            return
        reason = undelivered_reason(frame)
        changed = 0
        if isinstance(cmid, str) and cmid:
            changed = self.store.write(Outbox.mark_undelivered, cmid, message_id, reason)
        if changed:
            log.warning('outbox_undelivered', extra={'fields': {
                'mesh': self.name, 'client_message_id': cmid, 'reason': reason}})
            self.publish('message_undelivered', {
                'mesh': self.name, 'client_message_id': cmid, 'broker_message_id': message_id,
                'target_spec': frame.get('targetSpec'), 'reason': reason})
        self.send_frame({'type': 'meshd_undelivered_ack', 'messageId': message_id})

    def on_state_change(self, frame):
        """Another member set a shared key: an event for subscribers of this mesh."""
        key = frame.get('key')
        if not isinstance(key, str):
            return
        updated_by = frame.get('updatedBy')
        self.publish('state_change', {'mesh': self.name, 'key': key, 'value': frame.get('value'),
                                      'updated_by': updated_by if isinstance(updated_by, str)
                                      else None})

    def list_peers(self, max_age=0.0):
        """The broker's roster of this mesh, or None when it cannot be read.

        `max_age` lets `send` reuse a roster read moments ago: resolving every DM with a
        round trip to the broker would cap the accept rate. Any join or leave event on this
        mesh, and any reconnect, forgets the cached roster.
        """
        if (max_age and self._roster is not None and self.is_open
                and time.monotonic() - self._roster_at <= max_age):
            return self._roster
        reply = self.request({'type': 'list_peers'}, 'peers_list')
        if reply is None or not isinstance(reply.get('peers'), list):
            self.forget_roster()
            return None
        self._roster, self._roster_at = reply['peers'], time.monotonic()
        if self.on_roster is not None:
            self.on_roster(self.name, reply['peers'])
        return reply['peers']

    def forget_roster(self):
        self._roster = None

    def on_closed(self, code, reason):
        self.forget_roster()


class SessionLink(Link):
    """One registered session's own presence (`session_hello`, role session)."""

    kind = 'session'
    log_prefix = 'session_broker_'
    not_open_error = 'session_ws_not_open'

    def __init__(self, mesh, info, timings, supervisor, inbound, on_open=None):
        super().__init__(mesh, mesh['brokerUrl'], timings, supervisor, on_open)
        self.info = info
        self.inbound = inbound
        self.token = info.token
        self.pubkey = info.presence['session_pubkey']
        self.secret = info.presence['session_secret_key']

    @property
    def name(self):
        return self.info.token_prefix

    def build_hello(self):
        mesh, info = self.mesh, self.info
        try:
            attestation = crypto.make_attestation(mesh['pubkey'], mesh['secretKey'], self.pubkey,
                                                  clock.now_ms() + crypto.ATTESTATION_TTL_MS)
        except Exception as exc:
            log.warning('parent attestation re-mint failed; reusing stored token (may be expired)',
                        extra={'fields': {'err': str(exc)}})
            attestation = crypto.attestation_to_wire(info.presence['parent_attestation'])
        timestamp = clock.now_ms()
        hello = {'type': 'session_hello', 'meshId': mesh['meshId'],
                 'parentMemberId': mesh['memberId'], 'parentMemberPubkey': mesh['pubkey'],
                 'sessionPubkey': self.pubkey, 'parentAttestation': attestation,
                 'displayName': info.display_name, 'sessionId': info.session_id,
                 'pid': info.pid, 'cwd': info.hello_cwd,
                 'hostname': socket.gethostname(), 'peerType': 'ai',
                 'channel': 'claudemesh-session'}
        groups = [_group(g) for g in info.groups or []]
        if groups:
            hello['groups'] = groups
        if info.role:
            hello['role'] = info.role
        hello['meshdExt'] = _meshd_ext()
        hello['timestamp'] = timestamp
        hello['signature'] = crypto.sign_hex(self.secret, crypto.session_hello_text(
            mesh['meshId'], mesh['pubkey'], self.pubkey, timestamp))
        return hello

    def on_push(self, frame):
        if frame.get('subtype') == 'system' or frame.get('senderPubkey') == 'system':
            return  # the member link delivers system events once (1.34.9)
        sender = (frame.get('senderPubkey') or '').lower()
        if sender == self.pubkey:
            log.info('self_echo_dropped', extra={'fields': {'sender': sender[:12]}})
            return
        self.inbound.handle_push(self, frame, session_secret=self.secret)

    def _log(self, level, msg, **fields):
        fields.setdefault('session_pubkey', self.pubkey[:12])
        super()._log(level, msg, **fields)


def undelivered_reason(frame):
    """One line for `last_error` from a broker's undelivered notice."""
    reason = frame.get('reason')
    if reason == 'expired':
        ttl = frame.get('dmTtlSeconds')
        kept = (' (it keeps an undelivered DM %s)' % _duration(ttl)
                if isinstance(ttl, int) and not isinstance(ttl, bool) else '')
        return 'undelivered: expired at the broker before the recipient came online%s' % kept
    if reason == 'recipient_removed':
        return 'undelivered: the recipient was removed from the mesh'
    return 'undelivered: %s' % (reason if isinstance(reason, str) else 'refused by the broker')


def _duration(seconds):
    for unit, size in (('d', 86400), ('h', 3600), ('m', 60)):
        if seconds >= size and seconds % size == 0:
            return '%d%s' % (seconds // size, unit)
    return '%ds' % seconds


def _group(text):
    """'@name' or '@name:role' → {name, role?} for session_hello."""
    name, _, role = text.lstrip('@').partition(':')
    group = {'name': name}
    if role:
        group['role'] = role
    return group
