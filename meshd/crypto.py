"""Keys, signatures and DM encryption: the only module of meshd that imports nacl.

Everything here follows spec/wire.md §2 and §6 byte for byte: Ed25519 keys as lowercase hex
(secret = seed ‖ pubkey, libsodium's 64-byte format), detached signatures as 128 hex, the
canonical hello / session hello / attestation / invite strings, crypto_box DMs over keys derived
with ed2curve, and the unencrypted base64 body of multicast messages. Functions that check
something a peer sent (verify_hex, open_dm) never let a malformed input escape as anything but
their documented result.
"""
import base64
import functools
import hashlib
import json
import math
import re

import nacl.exceptions
import nacl.public
import nacl.signing
import nacl.utils

_HEX = {(64, False): re.compile(r'^[0-9a-f]{64}$'), (64, True): re.compile(r'^[0-9a-fA-F]{64}$'),
        (128, False): re.compile(r'^[0-9a-f]{128}$'),
        (128, True): re.compile(r'^[0-9a-fA-F]{128}$')}
NONCE_BYTES = 24
BOX_MAC_BYTES = 16       # crypto_box adds a Poly1305 tag to every sealed message
SESSION_ATTEST_PREFIX = 'claudemesh-session-attest'
SESSION_HELLO_PREFIX = 'claudemesh-session-hello'
FINGERPRINT_VERSION = '1'
ATTESTATION_TTL_MS = 12 * 3600 * 1000   # how long a parent attestation the daemon signs lasts


class DecryptError(Exception):
    """A DM could not be opened (bad key, bad nonce, tampered or malformed ciphertext)."""


# ----------------------------------------------------------------------------- keys

def generate_keypair():
    """Return a fresh Ed25519 keypair as (pubkey hex64, secret hex128 = seed ‖ pubkey)."""
    sk = nacl.signing.SigningKey.generate()
    pub = bytes(sk.verify_key)
    return pub.hex(), (bytes(sk) + pub).hex()


def keypair_from_seed(seed):
    """Return (pubkey hex64, secret hex128) for a 32-byte seed (test vectors, spec/wire.md §2.6)."""
    sk = nacl.signing.SigningKey(bytes(seed))
    pub = bytes(sk.verify_key)
    return pub.hex(), (bytes(sk) + pub).hex()


def _signing_key(sec_hex):
    """SigningKey from a 128-hex libsodium secret, checking that its pubkey half matches."""
    raw = bytes.fromhex(sec_hex)
    if len(raw) != 64:
        raise ValueError('secret key must be 128 hex characters')
    sk = nacl.signing.SigningKey(raw[:32])
    if bytes(sk.verify_key) != raw[32:]:
        raise ValueError('secret key does not match its public half')
    return sk


def public_from_secret(sec_hex):
    """Return the hex64 pubkey of a 128-hex secret key."""
    return bytes(_signing_key(sec_hex).verify_key).hex()


def is_hex64(value, any_case=False):
    """True when `value` is a 64-character hex string, lowercase unless any_case: a pubkey,
    a session token. The one check for it; wire fields that must be lowercase say so."""
    return isinstance(value, str) and bool(_HEX[64, any_case].match(value))


def is_hex128(value, any_case=False):
    """True when `value` is 128 hex characters: a secret key, a detached signature (either
    case for a signature a peer sent, as the reference accepts)."""
    return isinstance(value, str) and bool(_HEX[128, any_case].match(value))


# ----------------------------------------------------------------------------- signatures

def sign_hex(sec_hex, text):
    """Sign the UTF-8 bytes of `text` with a 128-hex secret; return the 128-hex detached signature."""
    return _signing_key(sec_hex).sign(text.encode('utf-8')).signature.hex()


def verify_hex(pub_hex, text, sig_hex):
    """True when `sig_hex` is a valid signature of `text` by `pub_hex`; False on any bad input."""
    try:
        if not is_hex64(pub_hex, any_case=True) or not is_hex128(sig_hex, any_case=True):
            return False
        vk = nacl.signing.VerifyKey(bytes.fromhex(pub_hex))
        vk.verify(text.encode('utf-8'), bytes.fromhex(sig_hex))
        return True
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError,
            ValueError, TypeError, AttributeError):
        return False


def js_integer(value):
    """Render an integral JSON number as JS does in a template string (`str(int)`), else None.

    bool is rejected explicitly (it is an int in Python); non-integral or non-finite floats give
    None so that callers can answer with the spec's error code.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return None


def _ts(value):
    rendered = js_integer(value)
    return rendered if rendered is not None else str(value)


def member_hello_text(mesh_id, member_id, pubkey, timestamp_ms):
    """Canonical string of a member `hello` (spec/wire.md §2.2)."""
    return '%s|%s|%s|%s' % (mesh_id, member_id, pubkey, _ts(timestamp_ms))


def session_hello_text(mesh_id, parent_member_pubkey, session_pubkey, timestamp_ms):
    """Canonical string of a `session_hello` (spec/wire.md §2.4)."""
    return '%s|%s|%s|%s|%s' % (SESSION_HELLO_PREFIX, mesh_id, parent_member_pubkey,
                               session_pubkey, _ts(timestamp_ms))


def attestation_text(parent_member_pubkey, session_pubkey, expires_at_ms):
    """Canonical string of a parent attestation (spec/wire.md §2.3)."""
    return '%s|%s|%s|%s' % (SESSION_ATTEST_PREFIX, parent_member_pubkey, session_pubkey,
                            _ts(expires_at_ms))


def make_attestation(member_pub_hex, member_sec_hex, session_pub_hex, expires_at_ms):
    """Return a parent attestation object with the wire's field names and order."""
    text = attestation_text(member_pub_hex, session_pub_hex, expires_at_ms)
    return {
        'sessionPubkey': session_pub_hex,
        'parentMemberPubkey': member_pub_hex,
        'expiresAt': int(expires_at_ms),
        'signature': sign_hex(member_sec_hex, text),
    }


# The wire names an attestation's fields in camelCase; the local API in snake_case.
_ATTESTATION_NAMES = (('sessionPubkey', 'session_pubkey'),
                      ('parentMemberPubkey', 'parent_member_pubkey'),
                      ('expiresAt', 'expires_at'), ('signature', 'signature'))


def attestation_to_api(wire):
    """An attestation as the local API spells it."""
    return {api: wire[name] for name, api in _ATTESTATION_NAMES}


def attestation_to_wire(api):
    """An attestation as the broker protocol spells it."""
    return {name: api[api_name] for name, api_name in _ATTESTATION_NAMES}


def session_presence(member_pub_hex, member_sec_hex, session_pub_hex, session_sec_hex,
                     now_ms, ttl_ms=ATTESTATION_TTL_MS):
    """A session's presence for sessions.register: its keypair and a fresh attestation."""
    wire = make_attestation(member_pub_hex, member_sec_hex, session_pub_hex, now_ms + ttl_ms)
    return {'session_pubkey': session_pub_hex, 'session_secret_key': session_sec_hex,
            'parent_attestation': attestation_to_api(wire)}


# ----------------------------------------------------------------------------- DMs and multicast

def _b64(raw):
    return base64.b64encode(raw).decode('ascii')


def _curve_secret(sec_hex):
    return _signing_key(sec_hex).to_curve25519_private_key()


def _curve_public(pub_hex):
    return nacl.signing.VerifyKey(bytes.fromhex(pub_hex)).to_curve25519_public_key()


def curve_secret_hex(sec_hex):
    """X25519 secret derived from an Ed25519 secret (ed2curve_sk), as hex (test vectors)."""
    return bytes(_curve_secret(sec_hex)).hex()


def curve_public_hex(pub_hex):
    """X25519 public key derived from an Ed25519 pubkey (ed2curve_pk), as hex (test vectors)."""
    return bytes(_curve_public(pub_hex)).hex()


@functools.lru_cache(maxsize=512)
def _box(sec_hex, pub_hex):
    # Two key conversions and an X25519 per message were most of a DM's crypto cost; the
    # precomputed box of a (own key, peer key) pair is reused for the pair's next messages.
    return nacl.public.Box(_curve_secret(sec_hex), _curve_public(pub_hex))


def seal_dm(plaintext_bytes, recipient_pub_hex, sender_sec_hex, nonce=None):
    """Encrypt a DM with crypto_box; return (nonce b64, ciphertext b64) as in spec/wire.md §6.1.

    `nonce` (24 bytes) is for test vectors only; by default a random one is drawn.
    """
    nonce = nacl.utils.random(NONCE_BYTES) if nonce is None else bytes(nonce)
    sealed = _box(sender_sec_hex, recipient_pub_hex).encrypt(bytes(plaintext_bytes), nonce)
    return _b64(nonce), _b64(sealed.ciphertext)


def open_dm(nonce_b64, ciphertext_b64, sender_pub_hex, recipient_sec_hex):
    """Decrypt a DM; return the plaintext bytes or raise DecryptError on any failure."""
    try:
        nonce = base64.b64decode(nonce_b64, validate=True)
        ciphertext = base64.b64decode(ciphertext_b64, validate=True)
        if len(nonce) != NONCE_BYTES:
            raise DecryptError('nonce must be 24 bytes')
        return _box(recipient_sec_hex, sender_pub_hex).decrypt(ciphertext, nonce)
    except DecryptError:
        raise
    except Exception as exc:  # any decode, key or MAC failure is one outcome for the caller
        raise DecryptError('cannot decrypt: %s' % exc.__class__.__name__)


def encode_plain(plaintext_bytes):
    """Encode a multicast body (spec/wire.md §6.2): random nonce, base64 of the plaintext."""
    return _b64(nacl.utils.random(NONCE_BYTES)), _b64(bytes(plaintext_bytes))


def decode_plain(ciphertext_b64):
    """Decode a multicast body; raise DecryptError when it is not valid base64."""
    try:
        return base64.b64decode(ciphertext_b64, validate=True)
    except Exception as exc:
        raise DecryptError('cannot decode: %s' % exc.__class__.__name__)


# ----------------------------------------------------------------------------- invites

def b64url_nopad(raw):
    """URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b'=').decode('ascii')


def b64url_decode(text):
    """Decode URL-safe base64 with optional padding; raise ValueError when invalid."""
    if not isinstance(text, str) or not re.match(r'^[A-Za-z0-9_-]*={0,2}$', text):
        raise ValueError('not base64url')
    text = text.rstrip('=')
    return base64.urlsafe_b64decode(text + '=' * (-len(text) % 4))


def invite_v1_text(payload):
    """Canonical string of a v1 invite (spec/wire.md §9.2) from its payload fields."""
    return '|'.join([_ts(payload['v']), str(payload['mesh_id']), str(payload['mesh_slug']),
                     str(payload['broker_url']), _ts(payload['expires_at']),
                     str(payload['mesh_root_key']), str(payload['role']),
                     str(payload['owner_pubkey'])])


def invite_v2_text(mesh_id, invite_id, expires_at_s, role, owner_pubkey):
    """Canonical string of a v2 invite capability (spec/wire.md §9.3; kept for the vector only)."""
    return 'v=2|%s|%s|%s|%s|%s' % (mesh_id, invite_id, _ts(expires_at_s), role, owner_pubkey)


def mint_invite_v1(mesh_id, mesh_slug, broker_url, expires_at_s, root_key, role,
                   owner_pub_hex, owner_sec_hex):
    """Return (payload dict in wire key order, token) for a v1 invite signed by the mesh owner."""
    payload = {
        'v': 1,
        'mesh_id': mesh_id,
        'mesh_slug': mesh_slug,
        'broker_url': broker_url,
        'expires_at': int(expires_at_s),
        'mesh_root_key': root_key,
        'role': role,
        'owner_pubkey': owner_pub_hex,
    }
    payload['signature'] = sign_hex(owner_sec_hex, invite_v1_text(payload))
    token = b64url_nopad(compact_json(payload).encode('utf-8'))
    return payload, token


# ----------------------------------------------------------------------------- encoding helpers

def compact_json(obj):
    """JSON as JS's JSON.stringify writes it: no spaces, non-ASCII unescaped."""
    return json.dumps(obj, separators=(',', ':'), ensure_ascii=False)


def _canonical_json(obj):
    if isinstance(obj, dict):
        return '{' + ','.join(compact_json(k) + ':' + _canonical_json(obj[k])
                              for k in sorted(obj)) + '}'
    if isinstance(obj, list):
        return '[' + ','.join(_canonical_json(v) for v in obj) + ']'
    return compact_json(obj)


def request_fingerprint(to, priority, body, reply_to_id=None, meta=None):
    """The daemon's request fingerprint (spec/wire.md §4.1), as 64 hex characters."""
    if to == '*':
        kind, ref = 'topic', '*'
    elif isinstance(to, str) and to.startswith('@'):
        kind, ref = 'topic', to[1:]
    else:
        kind, ref = 'dm', to
    parts = [FINGERPRINT_VERSION, kind, ref, reply_to_id or '', priority,
             _canonical_json(meta) if meta is not None else '']
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode('utf-8') + b'\x00')
    h.update(hashlib.sha256(body.encode('utf-8')).digest())
    return h.hexdigest()
