"""What the daemon's RPC method groups share: parameter checks, time formats, scopes."""
import datetime

from rpc.protocol import invalid_params

from meshd import crypto
from meshd.clock import iso_from_ms

KIB = 1024


def iso_to_ms(value, name):
    """An ISO-8601 parameter as epoch milliseconds (UTC when it names no zone)."""
    try:
        moment = datetime.datetime.fromisoformat(value.replace('Z', '+00:00'))
    except (AttributeError, ValueError):
        raise invalid_params('%r must be an ISO-8601 time' % name)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def iso(ms):
    return None if ms is None else iso_from_ms(ms)


def mesh_from_ctx(ctx, explicit):
    """The explicit non-blank mesh, else the attached session's mesh, else None (§8.1 #6)."""
    if isinstance(explicit, str) and explicit.strip():
        return explicit.strip()
    session = ctx.session
    return session.mesh if session is not None else None


def inbox_scope(ctx, member_pubkey):
    """(session pubkey, member pubkey) for a session with presence, else None (spec §8.5);
    `member_pubkey(slug)` is the member key of a joined mesh."""
    session = ctx.session
    if session is None or session.presence is None:
        return None
    return session.session_pubkey, member_pubkey(session.mesh)


def clamp(value, default, low, high):
    if value is None:
        return default
    return max(low, min(high, value))


def token(value, message):
    """A 64-hex session token, lowercased; invalid_params with `message` otherwise."""
    if not crypto.is_hex64(value, any_case=True):
        raise invalid_params(message)
    return value.lower()
