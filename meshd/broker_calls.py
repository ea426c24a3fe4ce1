"""Broker verbs the local API calls on a link: a reply awaited, or a frame written.

A verb with a reply is correlated by `_reqId` (wslink.Link.call); both reply families of
spec/wire.md §4.4 are read — meshd's broker sends claudemesh's real shapes, while
claudemesh's own daemon waits for `state_value`/`state_data`, `memory_stored.memoryId` and
`memory_recall_result.matches`, so a broker built to please that daemon answers in those.
Every failure becomes one RpcError with a stable `data.code`: `broker_unreachable` (no open
link), `broker_timeout` (no reply in time: retryable), `unsupported_by_broker` (a meshd
extension the broker did not announce), or the broker's own refusal (`forbidden`,
`not_found`, `invalid_params`, `broker_refused`).
"""
from rpc.protocol import (AUTH_ERROR, INVALID_PARAMS, NOT_FOUND, UPSTREAM_ERROR, RpcError)

from meshd.wslink import LinkTimeout, LinkUnavailable

# Reply types of each verb, both families.
REPLIES = {
    'get_state': ('state_result', 'state_value', 'state_data'),
    'list_state': ('state_list',),
    'remember': ('memory_stored',),
    'recall': ('memory_results', 'memory_recall_result'),
    'list_skills': ('skill_list',),
    'get_skill': ('skill_data',),
    'share_skill': ('skill_ack',),
    'remove_skill': ('skill_ack',),
    'kick': ('kick_ack',),
    'disconnect': ('disconnect_ack',),
    'ban': ('ban_ack',),
    'unban': ('unban_ack',),
    'list_bans': ('list_bans_result',),
    'meshd_grants_get': ('meshd_grants',),
    'meshd_grants_set': ('meshd_grants',),
    'message_status': ('message_status_result',),
}

# Broker error codes and what the caller reads.
_REFUSALS = {'forbidden': (AUTH_ERROR, 'forbidden'), 'not_found': (NOT_FOUND, 'not_found'),
             'invalid': (INVALID_PARAMS, 'invalid_params'),
             'invalid_argument': (INVALID_PARAMS, 'invalid_params')}


def unreachable(slug, detail):
    return RpcError.of(UPSTREAM_ERROR, 'broker_unreachable',
                       'broker of mesh "%s" is not connected' % slug, mesh=slug, detail=detail)


def require(link, slug, feature):
    """Refuse at once when the broker did not announce the meshd extension `feature`."""
    if link is None or not link.is_open:
        raise unreachable(slug, 'link %s' % ('missing' if link is None else link.status))
    if feature not in link.broker_features:
        raise RpcError.of(UPSTREAM_ERROR, 'unsupported_by_broker',
                          'the broker of mesh "%s" does not support %s' % (slug, feature),
                          mesh=slug, feature=feature)


def call(link, slug, frame):
    """Send a verb with a reply on `link` and return the reply frame; raises RpcError."""
    if link is None:
        raise unreachable(slug, 'no link')
    try:
        reply = link.call(frame, REPLIES[frame['type']])
    except LinkUnavailable as exc:
        raise unreachable(slug, str(exc))
    except LinkTimeout as exc:
        raise RpcError.of(UPSTREAM_ERROR, 'broker_timeout',
                          'the broker of mesh "%s" did not answer %s in time'
                          % (slug, frame['type']), mesh=slug, detail=str(exc), retryable=True)
    if reply.get('type') == 'error':
        broker_code = reply.get('code') if isinstance(reply.get('code'), str) else 'error'
        message = reply.get('message') if isinstance(reply.get('message'), str) else broker_code
        code, slug_code = _REFUSALS.get(broker_code, (UPSTREAM_ERROR, 'broker_refused'))
        raise RpcError.of(code, slug_code, message, mesh=slug, broker_code=broker_code)
    return reply


def notify(link, slug, frame):
    """Write a verb without a reply on `link`; it succeeded once written."""
    if link is None or not link.is_open:
        raise unreachable(slug, 'link %s' % ('missing' if link is None else link.status))
    if not link.send_frame(frame):
        raise unreachable(slug, 'write failed')


# -- the two reply families, read into one shape -------------------------------------

def state_row(reply):
    """{key, value, updatedBy, updatedAt} of a get_state reply, or None when the key is
    unset (`state_result` with an empty updatedAt, or a null `state`/`row`)."""
    if reply.get('type') == 'state_result':
        if not reply.get('updatedAt'):
            return None
        return {key: reply.get(key) for key in ('key', 'value', 'updatedBy', 'updatedAt')}
    row = reply.get('state', reply.get('row'))
    return _state_entry(row) if isinstance(row, dict) else None


def _state_entry(row):
    return {'key': row.get('key'), 'value': row.get('value'),
            'updatedBy': row.get('updatedBy', row.get('updated_by')),
            'updatedAt': row.get('updatedAt', row.get('updated_at'))}


def state_entries(reply):
    rows = reply.get('entries', reply.get('rows'))
    return [_state_entry(row) for row in rows or () if isinstance(row, dict)]


def memory_id(reply):
    value = reply.get('id') or reply.get('memoryId')
    return value if isinstance(value, str) else None


def memories(reply):
    rows = reply.get('memories') if 'memories' in reply else reply.get('matches')
    return [row for row in rows or () if isinstance(row, dict)]


def skills(reply):
    return [row for row in reply.get('skills') or () if isinstance(row, dict)]


def skill(reply):
    row = reply.get('skill')
    return row if isinstance(row, dict) else None
