"""How a message reads for an agent: channel notifications, hook context, tool text.

One rendering for every path (spec/agents.md §3), so a message reads the same whether it
arrives by channel, by hook or through a tool. Only a row sealed end to end to this session
(`e2e`) reads as a private message; any other row is labelled a broadcast that anyone on the
mesh could have sent, and a row that did not open is a warning without a body (DESIGN.md 27).
Channel meta is a record of string to string with identifier keys: one non-string value makes
Claude Code drop the whole notification, silently.

What the mesh shares changes too: another member's state change and a peer's new summary,
or its going into or out of dnd, are one short line each (`[team] state build_status =
"green" (by alice)`). Idle/working flips are left out: hooks post them at every turn, and a
channel line starts a turn, so telling them would keep a mesh of agents waking each other.
"""
import json
import re

META_KEY = re.compile(r'^[a-zA-Z_][a-zA-Z0-9_]*$')
CHANNEL_TAG = re.compile(r'<channel\s([^>]*)>', re.S)
TAG_ATTRIBUTE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')
SOURCE = 'meshd'
BODY_LIMIT = 4000          # characters of one message handed over by a hook or a tool
BADGES = {'now': '[URGENT] ', 'low': '[low] '}
SYSTEM_VERBS = {'peer_joined': 'joined', 'peer_returned': 'returned to',
                'peer_left': 'left'}
LINE_LIMIT = 200           # characters of a value or summary in a change line


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
    if kind == 'state_change':
        return state_change_notification(data)
    if kind == 'peer_changed':
        return peer_changed_notification(data)
    return None


def state_change_notification(data):
    """(content, meta) for another member's change of a shared state key, or None."""
    key = _one_line(data.get('key'))
    if not key:
        return None
    mesh = _one_line(data.get('mesh')) or 'mesh'
    by = _one_line(data.get('updated_by'))
    content = '[%s] state %s = %s%s' % (mesh, key[:LINE_LIMIT], _quoted(data.get('value')),
                                        ' (by %s)' % by if by else '')
    return content, meta_of({'kind': 'system', 'event': 'state_change', 'mesh_slug': mesh,
                             'state_key': key[:LINE_LIMIT], 'updated_by': by or None})


def peer_changed_notification(data):
    """(content, meta) for a peer's new summary or dnd status, or None for other changes
    (idle/working flips, groups, profile, visibility, names)."""
    changes = data.get('changes') if isinstance(data.get('changes'), dict) else {}
    pubkey = data.get('pubkey') if isinstance(data.get('pubkey'), str) else ''
    name = _one_line(data.get('display_name')) or pubkey[:8] or 'unknown'
    mesh = _one_line(data.get('mesh')) or 'mesh'
    lines, shown = [], []
    status = changes.get('status') if isinstance(changes.get('status'), dict) else {}
    before, after = status.get('from'), status.get('to')
    if before != after and 'dnd' in (before, after):
        shown.append('status')
        if after == 'dnd':
            lines.append('[%s] %s is now dnd (do not disturb)' % (mesh, name))
        else:
            lines.append('[%s] %s is no longer dnd: now %s' % (
                mesh, name, _one_line(after) or 'online'))
    summary = changes.get('summary') if isinstance(changes.get('summary'), dict) else None
    if summary is not None and summary.get('from') != summary.get('to'):
        after = summary.get('to')
        if isinstance(after, str) and after.strip():
            shown.append('summary')
            lines.append('[%s] %s: summary %s' % (mesh, name, _quoted(' '.join(after.split()))))
        elif summary.get('from'):
            shown.append('summary')
            lines.append('[%s] %s cleared their summary' % (mesh, name))
    if not lines:
        return None
    return '\n'.join(lines), meta_of({'kind': 'system', 'event': 'peer_changed',
                                      'peer_name': name, 'peer_pubkey': pubkey,
                                      'mesh_slug': mesh, 'changed': ','.join(shown)})


def _one_line(text):
    """`text` on one line (names and keys come from peers), '' when not a string."""
    return ' '.join(text.split()) if isinstance(text, str) else ''


def _quoted(value):
    """`value` as JSON on one line (a peer's newline cannot forge a line), cut if long."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= LINE_LIMIT else text[:LINE_LIMIT] + '…'


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
