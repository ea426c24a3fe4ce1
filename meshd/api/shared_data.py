"""state.*, memory.* and skills.*: what a mesh shares, kept at its broker (spec/wire.md §4.4).

Each call goes to the caller's link on the mesh docs/local-api.md says (meshd/api/routing.py)
and reads the broker's reply in either family (meshd/broker_calls.py). Objects from the
broker are passed through as it sends them, with `mesh` added.
"""
from rpc.protocol import NOT_FOUND, RpcError, invalid_params

from meshd import broker_calls as calls

MAX_KEY = 256
MAX_NAME = 256
MAX_TAGS = 32
_MISSING = object()     # `value` absent, as against a JSON null (which is a value)


def _text(value, name, limit=None):
    if not isinstance(value, str) or not value.strip():
        raise invalid_params("missing '%s' (string)" % name)
    if limit is not None and len(value) > limit:
        raise invalid_params("'%s' is longer than %d characters" % (name, limit))
    return value


def _tags(tags):
    if tags is None:
        return []
    if len(tags) > MAX_TAGS or not all(isinstance(t, str) and t for t in tags):
        raise invalid_params("'tags' must be at most %d non-empty strings" % MAX_TAGS)
    return tags


class SharedDataMethods:
    """Shared state, memories and skills over `routes` (meshd/api/routing.py)."""

    def __init__(self, routes):
        self.routes = routes

    def handlers(self):
        optional = {'session': 'optional'}
        return [
            ('state.get', self.state_get, dict(optional, result='{state:{key, value, '
                                                                'updatedBy, updatedAt, mesh}}')),
            ('state.list', self.state_list, dict(optional, result='{entries:[…], unreachable}')),
            ('state.set', self.state_set, dict(optional, result='{ok, key, mesh}')),
            ('memory.remember', self.memory_remember, dict(optional, result='{id, mesh}')),
            ('memory.recall', self.memory_recall, dict(optional,
                                                       result='{matches:[…], unreachable}')),
            ('memory.forget', self.memory_forget, dict(optional, result='{ok, id, mesh}')),
            ('skills.list', self.skills_list, dict(optional, result='{skills:[…], unreachable}')),
            ('skills.get', self.skills_get, dict(optional, result='{skill:{…, mesh}}')),
            ('skills.publish', self.skills_publish,
             dict(optional, params_limit=256 * 1024, result='{ok, name, action, mesh}')),
            ('skills.remove', self.skills_remove, dict(optional, result='{ok, name, removed, mesh}')),
        ]

    def _first_found(self, ctx, mesh, fetch, not_found):
        """(slug, row) of the first mesh, in slug order, where `fetch(link, slug)` found a
        row; raises `not_found(unreachable)` when none did."""
        rows, unreachable = self.routes.read(ctx, self.routes.many(ctx, mesh), fetch)
        for slug, row in rows.items():
            if row is not None:
                return slug, row
        raise not_found(unreachable)

    # -- state ---------------------------------------------------------------------------

    def state_get(self, ctx, key: str = None, mesh: str = None):
        """One shared key; without a mesh, the first joined mesh (by slug) that has it."""
        key = _text(key, 'key', MAX_KEY)

        def get(link, slug):
            return calls.state_row(calls.call(link, slug, {'type': 'get_state', 'key': key}))
        slug, row = self._first_found(ctx, mesh, get, lambda unreachable: RpcError.of(
            NOT_FOUND, 'state_not_found', 'no shared state "%s"' % key, key=key,
            unreachable=unreachable))
        return {'state': dict(row, mesh=slug)}

    def state_list(self, ctx, mesh: str = None):
        """Every shared key of the mesh (default: the session's, else every joined mesh)."""
        def entries(link, slug):
            return calls.state_entries(calls.call(link, slug, {'type': 'list_state'}))
        rows, unreachable = self.routes.read(ctx, self.routes.many(ctx, mesh), entries)
        return {'entries': [dict(entry, mesh=slug) for slug, found in rows.items()
                            for entry in found], 'unreachable': unreachable}

    def state_set(self, ctx, key: str = None, value: object = _MISSING, mesh: str = None):
        """Set a shared key to any JSON value; every other peer of the mesh is told."""
        key = _text(key, 'key', MAX_KEY)
        if value is _MISSING:
            raise invalid_params("missing 'value'")
        slug = self.routes.one(ctx, mesh)
        calls.notify(self.routes.link(ctx, slug), slug,
                     {'type': 'set_state', 'key': key, 'value': value})
        return {'ok': True, 'key': key, 'mesh': slug}

    # -- memory --------------------------------------------------------------------------

    def memory_remember(self, ctx, content: str = None, tags: list = None, mesh: str = None):
        """Store a memory the whole mesh can recall."""
        content = _text(content, 'content')
        slug = self.routes.one(ctx, mesh)
        reply = calls.call(self.routes.link(ctx, slug), slug,
                           {'type': 'remember', 'content': content, 'tags': _tags(tags)})
        return {'id': calls.memory_id(reply), 'mesh': slug}

    def memory_recall(self, ctx, query: str = None, mesh: str = None):
        """Memories whose content or tags match every word of the query."""
        query = _text(query, 'query')

        def recall(link, slug):
            return calls.memories(calls.call(link, slug, {'type': 'recall', 'query': query}))
        rows, unreachable = self.routes.read(ctx, self.routes.many(ctx, mesh), recall)
        return {'matches': [dict(row, mesh=slug) for slug, found in rows.items()
                            for row in found], 'unreachable': unreachable}

    def memory_forget(self, ctx, id: str = None, mesh: str = None):  # noqa: A002 - the wire name
        """Forget a memory by id."""
        memory_id = _text(id, 'id', MAX_NAME)
        slug = self.routes.one(ctx, mesh)
        calls.notify(self.routes.link(ctx, slug), slug,
                     {'type': 'forget', 'memoryId': memory_id})
        return {'ok': True, 'id': memory_id, 'mesh': slug}

    # -- skills --------------------------------------------------------------------------

    def skills_list(self, ctx, query: str = None, mesh: str = None):
        """The mesh's skills, those matching `query` (name, description or a tag) if given."""
        frame = {'type': 'list_skills'}
        if isinstance(query, str) and query.strip():
            frame['query'] = query.strip()

        def listing(link, slug):
            return calls.skills(calls.call(link, slug, frame))
        rows, unreachable = self.routes.read(ctx, self.routes.many(ctx, mesh), listing)
        return {'skills': [dict(row, mesh=slug) for slug, found in rows.items()
                           for row in found], 'unreachable': unreachable}

    def skills_get(self, ctx, name: str = None, mesh: str = None):
        """One skill with its instructions; without a mesh, the first mesh that has it."""
        name = _text(name, 'name', MAX_NAME)

        def get(link, slug):
            return calls.skill(calls.call(link, slug, {'type': 'get_skill', 'name': name}))
        slug, row = self._first_found(ctx, mesh, get, lambda unreachable: RpcError.of(
            NOT_FOUND, 'skill_not_found', 'no skill "%s"' % name, name=name,
            unreachable=unreachable))
        return {'skill': dict(row, mesh=slug)}

    def skills_publish(self, ctx, name: str = None, instructions: str = None,
                       description: str = None, tags: list = None, manifest: object = None,
                       mesh: str = None):
        """Publish (or replace) a skill the mesh's agents can use."""
        frame = {'type': 'share_skill', 'name': _text(name, 'name', MAX_NAME),
                 'instructions': _text(instructions, 'instructions'),
                 'description': description if isinstance(description, str) else '',
                 'tags': _tags(tags)}
        if manifest is not None:
            frame['manifest'] = manifest
        slug = self.routes.one(ctx, mesh)
        calls.call(self.routes.link(ctx, slug), slug, frame)
        return {'ok': True, 'name': frame['name'], 'action': 'shared', 'mesh': slug}

    def skills_remove(self, ctx, name: str = None, mesh: str = None):
        """Remove a skill from the mesh."""
        name = _text(name, 'name', MAX_NAME)
        slug = self.routes.one(ctx, mesh)
        reply = calls.call(self.routes.link(ctx, slug), slug,
                           {'type': 'remove_skill', 'name': name})
        return {'ok': True, 'name': name, 'removed': reply.get('action') == 'removed',
                'mesh': slug}
