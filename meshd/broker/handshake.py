"""Checks of `hello` and `session_hello`, and the choice of the presence a hello reattaches
(spec/wire.md §2–§3, §7.6).

`Handshake.admit()` is the one call: it runs the checks in the reference's order (§3.1,
§3.2) with the capacity check in between, and answers a Rejection, carrying the exact error
frame and close code of §3.4, or what the hello binds: its mesh, its member and the entry
it takes over, if any.
"""
import collections

from meshd import clock, crypto
from meshd.broker import protocol
from meshd.broker.models import Member, Mesh
from meshd.broker.presence import OFFLINE

MAX_PID = 2 ** 31 - 1
MAX_SESSION_ID = 256
MAX_ID = 64
MAX_NAME = 256
MAX_PATH = 4096
MAX_GROUPS = 64
REPLAY_CACHE_LIMIT = 200000
_OPTIONAL_TEXT = ('displayName', 'hostname', 'peerType', 'channel', 'model', 'role')

Rejection = collections.namedtuple('Rejection', 'code message close_code reason')


def reject(code, message):
    """A handshake rejection closing 1008 with the code as its reason."""
    return Rejection(code, message, protocol.CLOSE_POLICY, code)


def _prefix(kind):
    return 'session_hello rejected: ' if kind == 'session_hello' else 'hello rejected: '


def check_session_pubkey(frame, required):
    """`sessionPubkey` shape: lowercase hex64; optional (empty = absent) on a member hello."""
    value = frame.get('sessionPubkey')
    if not required and (value is None or value == ''):
        return None
    if not crypto.is_hex64(value):
        return reject('bad_session_pubkey', 'sessionPubkey must be 64 lowercase hex chars')
    return None


def check_parent_pubkey(frame):
    value = frame.get('parentMemberPubkey')
    if not crypto.is_hex64(value):
        return reject('bad_parent_pubkey', 'parentMemberPubkey must be 64 lowercase hex chars')
    return None


def check_attestation_binding(frame):
    att = frame.get('parentAttestation')
    if (not isinstance(att, dict) or att.get('sessionPubkey') != frame.get('sessionPubkey')
            or att.get('parentMemberPubkey') != frame.get('parentMemberPubkey')):
        return reject('attestation_mismatch',
                       'parentAttestation does not bind the claimed session+parent pubkeys')
    return None


def _text(value, limit, required=False):
    if value is None:
        return not required
    return isinstance(value, str) and (len(value) > 0 or not required) and len(value) <= limit


def _groups_ok(value):
    if value is None:
        return True
    if not isinstance(value, list) or len(value) > MAX_GROUPS:
        return False
    return all(isinstance(g, dict) and _text(g.get('name'), MAX_NAME, required=True)
               and _text(g.get('role'), MAX_NAME) for g in value)


def check_required(frame, kind):
    """meshd addition (§3.1): every hello field has its type and a sane size, else 1008
    `malformed`. The signed fields are checked by the signature; these are not signed, and
    a pid of -1 or 10^30 or an object as a hostname would otherwise be stored and listed
    to every peer."""
    pid = frame.get('pid')
    fields_ok = (
        _text(frame.get('sessionId'), MAX_SESSION_ID, required=True)
        and isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid <= MAX_PID
        and _text(frame.get('cwd'), MAX_PATH) and frame.get('cwd') is not None
        and _text(frame.get('meshId'), MAX_ID, required=True)
        and all(_text(frame.get(name), MAX_NAME) for name in _OPTIONAL_TEXT)
        and _groups_ok(frame.get('groups'))
        and (frame.get('meshdExt') is None or isinstance(frame.get('meshdExt'), dict)))
    if kind == 'hello':
        fields_ok = fields_ok and _text(frame.get('memberId'), MAX_ID)
    else:
        fields_ok = fields_ok and _text(frame.get('parentMemberId'), MAX_ID)
    if not fields_ok:
        return reject('malformed', _prefix(kind) + 'malformed')
    return None


class ReplayCache(object):
    """Signatures of the hellos accepted within the timestamp window.

    A hello is signed over its timestamp only, so a captured one is valid for the whole
    skew window; remembering each accepted signature until its timestamp leaves the
    window refuses a replay. Ed25519 signatures are deterministic, so a client's own
    fresh hello (a new timestamp) never collides with its previous one.
    """

    def __init__(self, limit=REPLAY_CACHE_LIMIT):
        self.limit = limit
        self._expiry = {}
        self._order = collections.deque()

    def seen(self, signature, expires_ms, now_ms):
        """True when `signature` was recorded and has not expired; record it otherwise."""
        while self._order and (self._order[0][0] <= now_ms or len(self._order) >= self.limit):
            expiry, old = self._order.popleft()
            if self._expiry.get(old) == expiry:
                del self._expiry[old]
        if self._expiry.get(signature, 0) > now_ms:
            return True
        self._expiry[signature] = expires_ms
        self._order.append((expires_ms, signature))
        return False

    def __len__(self):
        return len(self._expiry)


def check_replay(frame, cache, now_ms, skew_ms):
    """A hello whose signature was already accepted within its window is a replay."""
    if cache.seen(frame.get('signature'), frame['timestamp'] + skew_ms, now_ms):
        return reject('replayed', _prefix(frame.get('type')) + 'replayed')
    return None


def check_attestation(att, now_ms, max_ttl_ms):
    """The attestation checks of §2.3, in order: expiresAt, lifetime, shapes, signature."""
    expires_at = att.get('expiresAt')
    if not protocol.is_finite_number(expires_at):
        return reject('malformed', 'attestation rejected: malformed')
    if expires_at <= now_ms:
        return reject('expired', 'attestation rejected: expired')
    if expires_at > now_ms + max_ttl_ms:
        return reject('ttl_too_long', 'attestation rejected: ttl_too_long')
    parent, session, sig = att.get('parentMemberPubkey'), att.get('sessionPubkey'), att.get('signature')
    if (not crypto.is_hex64(parent, any_case=True) or not crypto.is_hex64(session, any_case=True)
            or not crypto.is_hex128(sig, any_case=True)):
        return reject('malformed', 'attestation rejected: malformed')
    text = crypto.attestation_text(parent, session, expires_at)
    if crypto.js_integer(expires_at) is None or not crypto.verify_hex(parent, text, sig):
        return reject('bad_signature', 'attestation rejected: bad_signature')
    return None


def check_hello_signature(frame, kind, now_ms, skew_ms):
    """Skew, shapes and signature of a hello (§2.2) or session_hello (§2.4)."""
    ts = frame.get('timestamp')
    if not protocol.is_finite_number(ts) or abs(now_ms - ts) > skew_ms:
        return reject('timestamp_skew', _prefix(kind) + 'timestamp_skew')
    sig = frame.get('signature')
    if kind == 'session_hello':
        signer = frame.get('sessionPubkey')
        text_args = (frame['meshId'], frame.get('parentMemberPubkey'), signer, ts)
    else:
        signer = frame.get('pubkey')
        text_args = (frame['meshId'], frame.get('memberId'), signer, ts)
    if (not crypto.is_hex64(signer, any_case=True) or not crypto.is_hex128(sig, any_case=True)
            or not isinstance(text_args[1], str)):
        return reject('malformed', _prefix(kind) + 'malformed')
    if kind == 'session_hello':
        text = crypto.session_hello_text(*text_args)
    else:
        text = crypto.member_hello_text(*text_args)
    if crypto.js_integer(ts) is None or not crypto.verify_hex(signer, text, sig):
        return reject('bad_signature', _prefix(kind) + 'bad_signature')
    return None


def lookup_member(mesh_id, pubkey, kind):
    """Find the member a hello claims; return (mesh, member, None) or (None, None, Rejection).

    Read from the database at every hello (never cached), so broker-admin changes apply at once.
    An archived mesh counts as absent (§9.1, D8).
    """
    mesh = Mesh.live(mesh_id)
    if mesh is not None:
        member = Member.active(mesh.id, pubkey)
        if member is not None:
            return mesh, member, None
        revoked = Member.any_with_key(mesh.id, pubkey)
        if revoked is not None:
            message = ('You\'ve been removed from "%s". Contact the mesh owner to rejoin.'
                       % (mesh.name or mesh.slug or mesh.id))
            return None, None, Rejection('revoked', message, protocol.CLOSE_BANNED,
                                         protocol.REASON_BANNED)
    message = 'parent pubkey not found in mesh' if kind == 'session_hello' else 'pubkey not found in mesh'
    return None, None, reject('unauthorized', message)


def check_parent_member_id(frame, member):
    value = frame.get('parentMemberId')
    if value is not None and value != '' and value != member.id:
        return reject('parent_member_id_mismatch', 'parentMemberId does not match parentMemberPubkey')
    return None


class Handshake(object):
    """Admits hellos against the connection map `presences` (for reattach and capacity),
    with the skew and attestation limits of `timings` and a replay cache; `clock_ms` is the
    clock the skew and attestation checks read (a test seam)."""

    def __init__(self, presences, timings, max_per_mesh, clock_ms=clock.now_ms):
        self.presences = presences
        self.timings = timings
        self.max_per_mesh = max_per_mesh
        self.clock_ms = clock_ms
        self.replay_cache = ReplayCache()

    def admit(self, frame, kind):
        """(Rejection, None), or (None, (mesh, member, entry to reattach or None))."""
        now_ms = self.clock_ms()
        pre, post = self._checks(frame, kind, now_ms)
        for check in pre:
            rejection = check()
            if rejection:
                return rejection, None
        member_pubkey = (frame.get('parentMemberPubkey') if kind == 'session_hello'
                         else frame.get('pubkey'))
        reattach = self._find_reattach(frame, kind, member_pubkey)
        takeovers = {e.presence_id for e in self.presences.in_mesh(frame['meshId'])
                     if e.session_id == frame['sessionId']}
        if reattach is not None:
            takeovers.add(reattach.presence_id)
        count = len([e for e in self.presences.in_mesh(frame['meshId'])
                     if e.presence_id not in takeovers])
        if count >= self.max_per_mesh:
            return reject('capacity', 'mesh at connection capacity'), None
        for check in post:
            rejection = check()
            if rejection:
                return rejection, None
        mesh, member, rejection = lookup_member(frame['meshId'], member_pubkey, kind)
        if rejection:
            return rejection, None
        if kind == 'session_hello':
            rejection = check_parent_member_id(frame, member)
            if rejection:
                return rejection, None
        if reattach is not None and reattach.member_id != member.id:
            reattach = None     # a key claimed by another member never takes over an entry
        # The lookups above yielded: the entry may have been evicted or reattached meanwhile.
        if reattach is not None and (not self.presences.contains(reattach)
                                     or (kind == 'hello' and reattach.lease != OFFLINE)):
            reattach = None
        return None, (mesh, member, reattach)

    def _checks(self, frame, kind, now_ms):
        skew_ms = self.timings['broker_hello_skew'] * 1000
        if kind == 'hello':
            pre = [lambda: check_session_pubkey(frame, required=False),
                   lambda: check_required(frame, kind)]
            post = [lambda: check_hello_signature(frame, kind, now_ms, skew_ms),
                    lambda: check_replay(frame, self.replay_cache, now_ms, skew_ms)]
        else:
            att_max_ms = self.timings['broker_attest_max'] * 1000
            pre = [lambda: check_session_pubkey(frame, required=True),
                   lambda: check_parent_pubkey(frame),
                   lambda: check_attestation_binding(frame),
                   lambda: check_required(frame, kind)]
            post = [lambda: check_attestation(frame['parentAttestation'], now_ms, att_max_ms),
                    lambda: check_hello_signature(frame, kind, now_ms, skew_ms),
                    lambda: check_replay(frame, self.replay_cache, now_ms, skew_ms)]
        return pre, post

    def _find_reattach(self, frame, kind, member_pubkey):
        session_pubkey = frame.get('sessionPubkey') or None
        for entry in self.presences.in_mesh(frame['meshId']):
            if kind == 'session_hello':
                if entry.session_pubkey == session_pubkey:
                    return entry
            elif entry.lease == OFFLINE and entry.member_pubkey == member_pubkey:
                if session_pubkey and entry.session_pubkey == session_pubkey:
                    return entry
                if (not session_pubkey and not entry.session_pubkey
                        and entry.session_id == frame['sessionId']):
                    return entry
        return None
