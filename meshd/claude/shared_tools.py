"""The MCP tools for what a mesh shares: presence, memories and shared state.

`set_status`, `set_summary`, `remember`, `recall` and `state` call the daemon's methods of
docs/local-api.md ("Shared data, presence, …") as the bridge's session, like the tools of
meshd/claude/tools.py, which runs them: text a model reads easily, a failure one line.
"""
import json

from rpc.client import RpcCallError

from meshd.claude.tools import ToolError

STATUSES = ['idle', 'working', 'dnd']
STATE_ACTIONS = ['get', 'set', 'list']
VALUE_LIMIT = 500           # characters of one value in a state list
MESH = {'type': 'string', 'description': 'mesh slug (default: this session\'s)'}
MISSING = object()

TOOLS = [
    {'name': 'set_status',
     'description': 'Tell the other sessions on the mesh how you are: idle, working, or dnd '
                    '(do not disturb: messages wait unless urgent). Hooks switch between '
                    'idle and working on their own; dnd stays until you change it.',
     'inputSchema': {'type': 'object', 'properties': {
         'status': {'type': 'string', 'enum': STATUSES},
         'mesh': MESH},
         'required': ['status']}},
    {'name': 'set_summary',
     'description': 'Set the one-line summary other sessions see next to your name in '
                    'list_peers: what you are working on. An empty summary clears it.',
     'inputSchema': {'type': 'object', 'properties': {
         'summary': {'type': 'string', 'description': 'one line, e.g. "fixing the login '
                                                      'tests in auth/"'},
         'mesh': MESH},
         'required': ['summary']}},
    {'name': 'remember',
     'description': 'Store a note in the mesh\'s shared memory, for every session on the mesh '
                    '(now and later) to find with recall.',
     'inputSchema': {'type': 'object', 'properties': {
         'content': {'type': 'string', 'description': 'the note'},
         'tags': {'type': 'array', 'items': {'type': 'string'},
                  'description': 'words to find it by'},
         'mesh': MESH},
         'required': ['content']}},
    {'name': 'recall',
     'description': 'Search the mesh\'s shared memory: notes whose text or tags contain every '
                    'word of the query, newest first.',
     'inputSchema': {'type': 'object', 'properties': {
         'query': {'type': 'string', 'description': 'words to look for'},
         'mesh': MESH},
         'required': ['query']}},
    {'name': 'state',
     'description': 'Read or write the mesh\'s shared key/value state, which every session on '
                    'the mesh sees (e.g. build_status, who owns which task). action get reads '
                    'one key, set writes one (others are told), list shows them all.',
     'inputSchema': {'type': 'object', 'properties': {
         'action': {'type': 'string', 'enum': STATE_ACTIONS},
         'key': {'type': 'string', 'description': 'the key (for get and set)'},
         'value': {'description': 'the value to store (for set): any JSON, a string, number, '
                                  'boolean, object, array or null'},
         'mesh': MESH},
         'required': ['action']}},
]


class SharedTools:
    """The handlers of TOOLS, calling `call(method, params)` (the bridge, as its session);
    `on_state_set(mesh or None, key, value)` hears every value this session sets, before it
    is set, so the bridge does not tell the agent of its own change when the mesh echoes it."""

    definitions = TOOLS

    def __init__(self, call, on_state_set=None):
        self.call = call
        self.on_state_set = on_state_set

    def handlers(self):
        return {'set_status': self.set_status, 'set_summary': self.set_summary,
                'remember': self.remember, 'recall': self.recall, 'state': self.state}

    def set_status(self, status=None, mesh=None):
        if status not in STATUSES:
            raise ToolError("'status' must be idle, working or dnd")
        result = self.call('status.set', _with_mesh({'status': status}, mesh))
        return 'status set to %s on %s' % (result.get('status', status),
                                           _meshes(result.get('meshes')))

    def set_summary(self, summary=None, mesh=None):
        if not isinstance(summary, str):
            raise ToolError("'summary' is required: one line (empty to clear it)")
        summary = ' '.join(summary.split())
        result = self.call('summary.set', _with_mesh({'summary': summary}, mesh))
        if not summary:
            return 'summary cleared on %s' % _meshes(result.get('meshes'))
        return 'summary set on %s: %s' % (_meshes(result.get('meshes')), _json(summary))

    def remember(self, content=None, tags=None, mesh=None):
        if not isinstance(content, str) or not content.strip():
            raise ToolError("'content' is required: the note to store")
        params = {'content': content}
        if isinstance(tags, str):
            tags = [tag.strip() for tag in tags.split(',')]
        if isinstance(tags, list) and tags:
            params['tags'] = [str(tag) for tag in tags if str(tag).strip()]
        elif tags not in (None, []):
            raise ToolError("'tags' must be a list of words")
        result = self.call('memory.remember', _with_mesh(params, mesh))
        return 'remembered on mesh %s (id %s); any session finds it with recall' % (
            result.get('mesh'), result.get('id'))

    def recall(self, query=None, mesh=None):
        if not isinstance(query, str) or not query.strip():
            raise ToolError("'query' is required: words to look for")
        result = self.call('memory.recall', _with_mesh({'query': query}, mesh))
        matches = result.get('matches') or []
        if not matches:
            text = 'no memories match %s' % _json(query)
        else:
            lines = ['%d %s %s:' % (len(matches), 'memory matches' if len(matches) == 1
                                    else 'memories match', _json(query))]
            for match in matches:
                tags = match.get('tags') or []
                lines.append('- %s (%sby %s, %s, mesh %s, id %s)' % (
                    match.get('content'), 'tags: %s; ' % ', '.join(map(str, tags)) if tags else '',
                    match.get('rememberedBy') or 'unknown', _when(match.get('rememberedAt')),
                    match.get('mesh'), match.get('id')))
            text = '\n'.join(lines)
        return text + _unreachable(result)

    def state(self, action=None, key=None, value=MISSING, mesh=None):
        if action not in STATE_ACTIONS:
            raise ToolError("'action' must be get, set or list")
        if action == 'list':
            return self._state_list(mesh)
        if not isinstance(key, str) or not key:
            raise ToolError("'key' is required to %s a state value" % action)
        if action == 'get':
            return self._state_get(key, mesh)
        if value is MISSING:
            raise ToolError("'value' is required to set a state value (any JSON; null "
                            "clears it)")
        if self.on_state_set is not None:       # before the mesh can echo it
            self.on_state_set(mesh if isinstance(mesh, str) and mesh else None, key, value)
        result = self.call('state.set', _with_mesh({'key': key, 'value': value}, mesh))
        return 'state %s = %s on mesh %s; the other sessions are told' % (
            key, _json(value), result.get('mesh'))

    def _state_get(self, key, mesh):
        try:
            state = self.call('state.get', _with_mesh({'key': key}, mesh))['state']
        except RpcCallError as exc:
            if exc.slug == 'state_not_found':
                return 'state %s is not set%s' % (key, ' on mesh %s' % mesh if mesh else '')
            raise
        return 'state %s = %s (set by %s, %s, mesh %s)' % (
            state.get('key', key), _json(state.get('value')), state.get('updatedBy') or 'unknown',
            _when(state.get('updatedAt')), state.get('mesh'))

    def _state_list(self, mesh):
        result = self.call('state.list', _with_mesh({}, mesh))
        entries = result.get('entries') or []
        if not entries:
            text = 'no shared state is set'
        else:
            text = '\n'.join('- %s = %s (by %s, %s, mesh %s)' % (
                entry.get('key'), _json(entry.get('value'), VALUE_LIMIT),
                entry.get('updatedBy') or 'unknown', _when(entry.get('updatedAt')),
                entry.get('mesh')) for entry in entries)
        return text + _unreachable(result)


def _with_mesh(params, mesh):
    if isinstance(mesh, str) and mesh:
        params['mesh'] = mesh
    return params


def _json(value, limit=None):
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    if limit is not None and len(text) > limit:
        return text[:limit] + ' … (cut)'
    return text


def _when(iso_time):
    return (iso_time or 'unknown time')[:19].replace('T', ' ')


def _meshes(meshes):
    if isinstance(meshes, list) and meshes:
        return 'mesh%s %s' % ('es' if len(meshes) > 1 else '', ', '.join(map(str, meshes)))
    return 'no mesh'


def _unreachable(result):
    if result.get('unreachable'):
        return '\nbroker unreachable for: %s' % ', '.join(map(str, result['unreachable']))
    return ''
