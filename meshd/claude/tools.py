"""The MCP tools of `meshd mcp`: for sessions whose Bash is restricted (spec/agents.md §2).

Each tool calls the daemon as the bridge's session and returns text a model reads easily;
a failure is `isError: true` with the one-line reason. Rows `read_inbox` returns count as
surfaced through `tool`. The tools of shared data (status, summary, memory, state) are
meshd/claude/shared_tools.py; `Tools` runs them too.
"""
import logging

from rpc.client import RpcCallError, RpcConnectionError

from meshd.claude import render

log = logging.getLogger(__name__)

PRIORITIES = ['now', 'next', 'low']

TOOLS = [
    {'name': 'send_message',
     'description': 'Send a message to another agent session on the mesh: a display name, a '
                    'hex key prefix, @group, or * for everyone. Direct messages are end-to-end '
                    'encrypted.',
     'inputSchema': {'type': 'object', 'properties': {
         'to': {'type': 'string', 'description': 'display name, key prefix, @group or *'},
         'message': {'type': 'string', 'description': 'the text to send'},
         'mesh': {'type': 'string', 'description': 'mesh slug (default: this session\'s)'},
         'priority': {'type': 'string', 'enum': PRIORITIES,
                      'description': 'now interrupts, next (default) waits for a pause, low '
                                     'waits until the recipient is idle'},
         'reply_to_id': {'type': 'string',
                         'description': 'message_id of the message this answers'}},
         'required': ['to', 'message']}},
    {'name': 'list_peers',
     'description': 'List the sessions and members on the mesh you can message.',
     'inputSchema': {'type': 'object', 'properties': {
         'mesh': {'type': 'string', 'description': 'mesh slug (default: this session\'s)'}}}},
    {'name': 'read_inbox',
     'description': 'Read messages other sessions sent to this session, newest first.',
     'inputSchema': {'type': 'object', 'properties': {
         'unread_only': {'type': 'boolean', 'description': 'only messages not read before'},
         'limit': {'type': 'integer', 'minimum': 1, 'maximum': 100,
                   'description': 'at most this many (default 20)'}}}},
    {'name': 'mesh_status',
     'description': 'Who this session is on the mesh, whether its broker is connected, and '
                    'how many peers are online and messages unread.',
     'inputSchema': {'type': 'object', 'properties': {}}},
]


class ToolError(Exception):
    """A tool call that failed: its text is the one line the model reads."""


class Tools:
    """Runs tools with `call(method, params)` (the bridge, as its session); `identity()` is
    the bridge's session (None without one); `more` are further tool sets, each with
    `definitions` and `handlers()` (meshd/claude/shared_tools.py)."""

    def __init__(self, call, identity, more=()):
        self.call = call
        self.identity = identity
        self.definitions = list(TOOLS)
        self._handlers = {'send_message': self.send_message, 'list_peers': self.list_peers,
                          'read_inbox': self.read_inbox, 'mesh_status': self.mesh_status}
        for tool_set in more:
            self.definitions += tool_set.definitions
            self._handlers.update(tool_set.handlers())

    def run(self, name, arguments):
        """The tools/call result for `name` with `arguments`."""
        handler = self._handlers.get(name)
        if handler is None:
            return _result('unknown tool: %s' % name, error=True)
        if not isinstance(arguments, dict):
            return _result('arguments must be an object', error=True)
        try:
            return _result(handler(**_known(handler, arguments)))
        except ToolError as exc:
            return _result(str(exc), error=True)
        except RpcCallError as exc:
            return _result('%s' % exc.error.get('message'), error=True)
        except RpcConnectionError as exc:
            return _result('the meshd daemon is not reachable: %s' % exc, error=True)

    def send_message(self, to=None, message=None, mesh=None, priority=None, reply_to_id=None):
        if not isinstance(to, str) or not to.strip():
            raise ToolError("'to' is required: a display name, key prefix, @group or *")
        if not isinstance(message, str) or not message:
            raise ToolError("'message' is required")
        if priority is not None and priority not in PRIORITIES:
            raise ToolError("'priority' must be now, next or low")
        params = {'to': to, 'message': message}
        for key, value in (('mesh', mesh), ('priority', priority),
                           ('reply_to_id', reply_to_id)):
            if isinstance(value, str) and value:
                params[key] = value
        result = self.call('send', params)
        target = result.get('recipient_name') or result['target_spec']
        if result.get('recipient_online') is False:
            state = 'queued: %s is offline now and gets it when back (until %s)' % (
                target, result['expires_at'])
        elif result.get('recipient_online'):
            state = 'sent to %s (online)' % target
        else:
            state = 'sent to %s' % target
        return '%s on mesh %s; client_message_id %s%s' % (
            state, result['mesh'], result['client_message_id'],
            ' (a retry of an earlier send)' if result.get('duplicate') else '')

    def list_peers(self, mesh=None):
        params = {'mesh': mesh} if isinstance(mesh, str) and mesh else {}
        result = self.call('peers.list', params)
        # Sessions first; a member's daemon is listed too, since a message to the member's
        # name lands in that daemon's inbox (DESIGN.md 17).
        peers = sorted(result['peers'], key=lambda p: _is_daemon(p))
        if not peers:
            text = 'nobody else is online'
        else:
            text = '\n'.join('%s · %s… · %s · mesh %s%s%s' % (
                p.get('displayName'), str(p.get('pubkey'))[:12], p.get('status') or 'online',
                p.get('mesh'), ' · member daemon (no agent session)' if _is_daemon(p) else '',
                ' · %s' % p['summary'] if p.get('summary') else '') for p in peers)
        if result.get('unreachable'):
            text += '\nbroker unreachable for: %s' % ', '.join(result['unreachable'])
        return text

    def read_inbox(self, unread_only=False, limit=20):
        limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else 20
        items = self.call('inbox.list', {'unread_only': bool(unread_only), 'mark_seen': True,
                                         'limit': max(1, min(100, limit))})['items']
        if not items:
            return 'no unread messages' if unread_only else 'the inbox is empty'
        text = '\n'.join(render.hook_lines(item) for item in items)
        self.call('inbox.mark_surfaced', {'ids': [item['id'] for item in items],
                                          'via': 'tool'})
        return text

    def mesh_status(self):
        identity = self.identity()
        health = self.call('daemon.health')
        lines = []
        if identity is None:
            lines.append('this session has no mesh identity')
        else:
            link = health['brokers'].get(identity.mesh, {})
            lines.append('session "%s" (%s) on mesh %s; broker %s (%s)' % (
                identity.display_name, identity.session_id[:8], identity.mesh,
                link.get('status', 'unknown'), link.get('state', 'unknown')))
            unread = self.call('inbox.list', {'unread_only': True, 'limit': 1000})['items']
            lines.append('%d unread message%s' % (len(unread), '' if len(unread) == 1 else 's'))
        for slug, link in sorted(health['brokers'].items()):
            lines.append('mesh %s: broker %s (%s)' % (slug, link.get('status'),
                                                      link.get('state')))
        return '\n'.join(lines)


def _is_daemon(peer):
    return peer.get('peerRole') == 'control-plane' or peer.get('channel') == 'claudemesh-daemon'


def _known(handler, arguments):
    """The arguments `handler` names; others (a model's guesses) are ignored."""
    names = handler.__code__.co_varnames[1:handler.__code__.co_argcount]
    return {key: value for key, value in arguments.items() if key in names}


def _result(text, error=False):
    result = {'content': [{'type': 'text', 'text': text}]}
    if error:
        result['isError'] = True
    return result
