"""Checks of `hello` and `session_hello`, each returning a Rejection or None (spec/wire.md §2–§3).

The server calls them in the reference's order (§3.1, §3.2) and puts the capacity check in
between; each Rejection carries the exact error frame and close code of §3.4.
"""
import collections
import re

from meshd import crypto
from meshd.broker import protocol, store

LOWER_HEX64 = re.compile(r'^[0-9a-f]{64}$')
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
    if not isinstance(value, str) or not LOWER_HEX64.match(value):
        return reject('bad_session_pubkey', 'sessionPubkey must be 64 lowercase hex chars')
    return None


def check_parent_pubkey(frame):
    value = frame.get('parentMemberPubkey')
    if not isinstance(value, str) or not LOWER_HEX64.match(value):
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
    if (not crypto.is_pubkey_hex(parent, any_case=True) or not crypto.is_pubkey_hex(session, any_case=True)
            or not crypto.is_signature_hex(sig)):
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
    if (not crypto.is_pubkey_hex(signer, any_case=True) or not crypto.is_signature_hex(sig)
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
    mesh = (store.Mesh.select()
            .where((store.Mesh.id == mesh_id) & store.Mesh.archived_at.is_null())
            .first())
    if mesh is not None:
        member = store.Member.active(mesh.id, pubkey)
        if member is not None:
            return mesh, member, None
        revoked = (store.Member.select()
                   .where((store.Member.mesh_id == mesh.id) & (store.Member.peer_pubkey == pubkey))
                   .first())
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
