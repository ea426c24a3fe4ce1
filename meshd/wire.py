"""The frames the daemon writes to a broker that are built in more than one place.

`send` frames are sealed once, when `send` accepts the message, and written by the drain,
possibly many times; the daemon measures a frame before accepting it so that one it could
never deliver is refused up front (spec/wire.md §4.1).
"""
from meshd import crypto

FRAME_LIMIT = 65536     # the broker's MAX_MESSAGE_BYTES, as the reference configures it
PRIORITIES = ('now', 'next', 'low')


def send_frame(client_message_id, fingerprint, target, priority, nonce, ciphertext):
    """The `send` frame of one outbox row (`fingerprint` as bytes)."""
    return {'type': 'send', 'id': client_message_id, 'client_message_id': client_message_id,
            'request_fingerprint': fingerprint.hex(), 'targetSpec': target,
            'priority': priority if priority in ('now', 'low') else 'next',
            'nonce': nonce, 'ciphertext': ciphertext}


def frame_length(frame):
    """The bytes `frame` takes on the wire (compact UTF-8 JSON)."""
    return len(crypto.compact_json(frame).encode('utf-8'))


def largest_message(frame, is_dm):
    """The most message bytes a frame like `frame` (same target, id and priority) can carry
    within FRAME_LIMIT: the ciphertext is base64, and a sealed DM adds a 16-byte MAC."""
    room = FRAME_LIMIT - frame_length(dict(frame, ciphertext=''))
    return max(0, room // 4 * 3 - (crypto.BOX_MAC_BYTES if is_dm else 0))
