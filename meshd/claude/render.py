"""How a message reads for an agent: channel notifications, hook context, tool text.

One rendering for every path (spec/agents.md §3), so a message reads the same whether it
arrives by channel, by hook or through a tool. Only a row sealed end to end to this session
(`e2e`) reads as a private message; any other row is labelled a broadcast that anyone on the
mesh could have sent, and a row that did not open is a warning without a body (DESIGN.md 27).
Channel meta is a record of string to string with identifier keys: one non-string value makes
Claude Code drop the whole notification, silently.
"""
import re

META_KEY = re.compile(r'^[a-zA-Z_][a-zA-Z0-9_]*$')
CHANNEL_TAG = re.compile(r'<channel\s([^>]*)>', re.S)
TAG_ATTRIBUTE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')
SOURCE = 'meshd'
BODY_LIMIT = 4000          # characters of one message handed over by a hook or a tool
BADGES = {'now': '[URGENT] ', 'low': '[low] '}
SYSTEM_VERBS = {'peer_joined': 'joined', 'peer_returned': 'returned to',
                'peer_left': 'left'}


def meta_of(values):
    """`values` as channel meta: strings only, identifier keys, None dropped."""
    meta = {}
    for key, value in values.items():
        if value is None or not META_KEY.match(key):
            continue
        if isinstance(value, bool):
            value = 'true' if value else 'false'
        meta[key] = value if isinstance(value, str) else str(value)
    return meta


def kind_of(item):
    if item.get('decrypt_failed'):
        return 'undecryptable'
    return 'direct' if item.get('e2e') else 'broadcast'


def headline(item):
    """`[URGENT] alice (#topic)` with what kind of message it is."""
    badge = BADGES.get(item.get('priority') or 'next', '')
    name = item.get('sender_name') or (item.get('sender_pubkey') or '')[:8] or 'unknown'
    topic = ' (#%s)' % item['topic'] if item.get('topic') else ''
    kind = kind_of(item)
    if kind == 'undecryptable':
        return '%s[warning] a message claiming to be from %s%s could not be decrypted' % (
            badge, name, topic)
    if kind == 'broadcast':
        return '%s[broadcast, not end-to-end encrypted] %s%s' % (badge, name, topic)
    return '%s%s%s' % (badge, name, topic)


def body_of(item, limit=None):
    if item.get('decrypt_failed') or item.get('body') is None:
        return '(no readable text)'
    body = item['body']
    if limit is not None and len(body) > limit:
        return body[:limit] + ' … (cut; the whole text: `meshd inbox`)'
    return body


def message_notification(item):
    """(content, meta) of the channel notification for an inbox item."""
    content = '%s: %s' % (headline(item), body_of(item))
    meta = meta_of({
        'kind': kind_of(item), 'from_name': item.get('sender_name'),
        'from_pubkey': item.get('sender_pubkey'),
        'from_member_pubkey': item.get('sender_member_pubkey'),
        'mesh_slug': item.get('mesh'), 'priority': item.get('priority') or 'next',
        'inbox_id': item.get('id'), 'message_id': item.get('broker_message_id'),
        'client_message_id': item.get('client_message_id'), 'topic': item.get('topic'),
        'reply_to_id': item.get('reply_to_id'), 'subtype': item.get('subtype')})
    return content, meta


def system_notification(kind, data):
    """(content, meta) for a peer event or a notice about our own message, or None."""
    event = data.get('event')
    if kind in ('peer_join', 'peer_leave') and event in SYSTEM_VERBS:
        name = data.get('name') or 'unknown'
        pubkey = data.get('pubkey') if isinstance(data.get('pubkey'), str) else ''
        groups = data.get('groups')
        group_text = ''
        if isinstance(groups, list) and groups:
            group_text = ' [%s]' % ', '.join(
                '@%s' % (g.get('name') if isinstance(g, dict) else g) for g in groups)
        last_seen = ' — last seen %s' % data['lastSeenAt'] if data.get('lastSeenAt') else ''
        content = '[system] Peer "%s" (%s)%s %s the mesh%s' % (
            name, pubkey[:8], group_text, SYSTEM_VERBS[event], last_seen)
        return content, meta_of({'kind': 'system', 'event': event, 'peer_name': name,
                                 'peer_pubkey': pubkey, 'mesh_slug': data.get('mesh')})
    if kind == 'message_undelivered':
        content = ('[system] your message %s to %s was not delivered: %s' % (
            data.get('client_message_id') or '', data.get('target_spec') or 'a peer',
            data.get('reason') or 'unknown reason'))
        return content, meta_of({'kind': 'system', 'event': 'undelivered',
                                 'client_message_id': data.get('client_message_id'),
                                 'mesh_slug': data.get('mesh')})
    return None


def hook_lines(item, limit=BODY_LIMIT):
    """The lines a hook or a tool shows for one inbox item."""
    when = (item.get('received_at') or '')[:19].replace('T', ' ')
    return '- %s [%s] %s (id %s): %s' % (headline(item), item.get('mesh'), when,
                                         (item.get('id') or '')[:8], body_of(item, limit))


def hook_text(items, more, event):
    """The context a hook hands over: the messages, then how to go on."""
    lines = ['meshd: %d message%s from the mesh for this session%s:' % (
        len(items), '' if len(items) == 1 else 's',
        ' (urgent)' if event == 'Stop' else '')]
    lines += [hook_lines(item) for item in items]
    if more > 0:
        lines.append('%d more: run `meshd inbox`.' % more)
    lines.append('Reply with the send_message tool, or `meshd send <name> <message>`.')
    return '\n'.join(lines)


def channel_ids(prompt):
    """The inbox ids named in meshd's `<channel>` tags of a prompt (a channel turn)."""
    ids = []
    for match in CHANNEL_TAG.finditer(prompt or ''):
        attributes = dict(TAG_ATTRIBUTE.findall(match.group(1)))
        if attributes.get('source') == SOURCE and attributes.get('inbox_id'):
            ids.append(attributes['inbox_id'])
    return ids
