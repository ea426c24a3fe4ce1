"""Frames of the claudemesh broker protocol as meshd's broker writes them (spec/wire.md §3–§5).

Every builder returns a dict whose key order is the reference's, so that `encode()` (compact
JSON, non-ASCII unescaped) gives the same bytes as the claudemesh broker. Optional fields the
reference leaves `undefined` are absent; fields it sends as `null` are present as None.
"""
import json
import math
import secrets
import string
import uuid

from meshd import clock

# Close codes and reasons (spec/wire.md §1, "Close codes the broker uses").
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_KICKED = 4001
CLOSE_BANNED = 4002
REASON_SHUTDOWN = 'shutting down'
REASON_TOO_BIG = 'Max payload size exceeded'
REASON_REPLACED = 'session_replaced'
REASON_BANNED = 'banned'

# Error strings of `send` acks (spec/wire.md §4.1); the dash of the rate-limit string is U+2014.
ERR_RATE_LIMIT = 'rate_limit: max %d msg/min (burst %d) \u2014 slow down'
ERR_TOO_LARGE = 'payload too large: %d bytes > MAX_MESSAGE_BYTES=%d'
ERR_NO_PEER = ('no connected peer for target (not online, or targetSpec is your own key '
               'without another session)')
ERR_BLOCKED = 'blocked by recipient grants (sender lacks dm capability)'
ERR_BAD_PRIORITY = 'invalid send: priority must be now|next|low'
ERR_BAD_FIELDS = 'invalid send: targetSpec, nonce and ciphertext must be strings'
ERR_TOPIC = 'invalid target: #topics are not supported by this broker'
ERR_INTERNAL = 'internal error'

PRIORITIES = ('now', 'next', 'low')
STATUSES = ('idle', 'working', 'dnd')
DEFAULT_CAPS = ('read', 'dm', 'broadcast', 'state-read')
DEFAULT_SELF_EDITABLE = {'displayName': True, 'roleTag': True, 'groups': True, 'messageMode': True}

_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
ID_LENGTH = 32


class BadFrame(ValueError):
    """An inbound frame is not a JSON object."""


def new_id(length=ID_LENGTH):
    """A random base62 id (mesh, member, presence, queue row), like the reference's generateId().

    One read of the kernel's random source per id (a `secrets.choice` per character was 32
    getrandom calls for every queued message); bytes of 248 and above are rejected so that
    every character stays uniform.
    """
    chars = []
    while len(chars) < length:
        chars.extend(_ALPHABET[b % 62] for b in secrets.token_bytes(length + 8) if b < 248)
    return ''.join(chars[:length])


def encode(frame):
    """Compact JSON text as JSON.stringify writes it."""
    return json.dumps(frame, separators=(',', ':'), ensure_ascii=False)


def _refuse_constant(name):
    raise ValueError('non-finite number %s' % name)


def decode(data):
    """Parse one inbound frame (text or binary) into a dict; raise BadFrame otherwise.

    NaN and Infinity are refused (Python's json accepts them, JSON does not; spec/wire.md §6.4).
    """
    try:
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data).decode('utf-8')
        obj = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadFrame('frame is not a JSON object')
    if not isinstance(obj, dict):
        raise BadFrame('frame is not a JSON object')
    # JSON may escape a lone UTF-16 surrogate, which is not text: no column or frame can
    # carry it. Only a `\ud8..\udf` escape can make one, so most frames skip the walk.
    if '\\u' in data and _has_surrogate(obj):
        raise BadFrame('frame is not valid text (lone surrogate)')
    return obj


def _has_surrogate(value):
    if isinstance(value, str):
        return any('\ud800' <= c <= '\udfff' for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def iso(dt):
    """`YYYY-MM-DDTHH:MM:SS.mmmZ` for a naive UTC datetime (milliseconds truncated)."""
    return dt.strftime('%Y-%m-%dT%H:%M:%S.') + '%03dZ' % (dt.microsecond // 1000)


def is_finite_number(value):
    """JS's Number.isFinite on a parsed JSON value (bools and strings are not numbers)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def req_id(frame):
    """The `_reqId` a frame carries, when it is a string (replies echo it)."""
    value = frame.get('_reqId')
    return value if isinstance(value, str) else None


def with_req(reply, frame):
    """`reply` with the `_reqId` of `frame`, when it had one."""
    value = req_id(frame)
    if value is not None:
        reply['_reqId'] = value
    return reply


# ----------------------------------------------------------------------------- builders

def error(code, message, req_id=None, msg_id=None):
    """`{"type":"error","code","message","id"?,"_reqId"?}` (spec/wire.md §3.4)."""
    frame = {'type': 'error', 'code': code, 'message': message}
    if msg_id:
        frame['id'] = msg_id
    if req_id is not None:
        frame['_reqId'] = req_id
    return frame


def ack(msg_id, message_id='', queued=False, err=None, req_id=None):
    """`{"type":"ack","id","messageId","queued","error"?,"_reqId"?}` (spec/wire.md §5.1)."""
    frame = {'type': 'ack', 'id': msg_id if isinstance(msg_id, str) else '',
             'messageId': message_id, 'queued': queued}
    if err:
        frame['error'] = err
    if req_id is not None:
        frame['_reqId'] = req_id
    return frame


def drained_push(row, mesh_id, sender_pubkey):
    """Push shape (a): a queue row delivered by a drain (spec/wire.md §5.2)."""
    frame = {
        'type': 'push', 'messageId': row.id, 'meshId': mesh_id, 'senderPubkey': sender_pubkey,
        'priority': row.priority, 'nonce': row.nonce, 'ciphertext': row.ciphertext,
        'createdAt': iso(row.created_at),
    }
    if row.client_message_id is not None:
        frame['client_message_id'] = row.client_message_id
    if row.request_fingerprint is not None:
        frame['request_fingerprint'] = row.request_fingerprint
    return frame


def multicast_push(message_id, mesh_id, sender, priority, nonce, ciphertext, created_at):
    """Push shape (b): live multicast, sent by the fan-out (spec/wire.md §5.2)."""
    return {
        'type': 'push', 'messageId': message_id, 'meshId': mesh_id,
        'senderPubkey': sender.pubkey, 'senderMemberPubkey': sender.member_pubkey,
        'senderMemberId': sender.member_id, 'senderName': sender.display_name,
        'priority': priority, 'nonce': nonce, 'ciphertext': ciphertext,
        'createdAt': iso(created_at),
    }


def system_push(event, event_data, mesh_id, priority='low'):
    """Push shape (c): a system event, never queued (spec/wire.md §5.2, §5.4)."""
    return {
        'type': 'push', 'subtype': 'system', 'event': event, 'eventData': event_data,
        'messageId': str(uuid.uuid4()), 'meshId': mesh_id, 'senderPubkey': 'system',
        'priority': priority, 'nonce': '', 'ciphertext': '', 'createdAt': iso(clock.utcnow()),
    }


def undelivered_notice(message_id, client_message_id, target_spec, reason, created_at,
                       undelivered_at, dm_ttl):
    """meshd extension `undelivered` (docs/wire-extensions.md): a DM of the recipient's
    sender that the broker gave up on. Sent only to a member link that announced it."""
    return {'type': 'meshd_undelivered', 'messageId': message_id,
            'clientMessageId': client_message_id, 'targetSpec': target_spec, 'reason': reason,
            'createdAt': iso(created_at), 'undeliveredAt': iso(undelivered_at),
            'dmTtlSeconds': int(dm_ttl)}
