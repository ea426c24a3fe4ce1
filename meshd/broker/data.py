"""The daemon-data verbs: shared state, memories and skills (spec/wire.md §4.4).

Replies use the claudemesh broker's real shapes (`state_result`, `memory_stored.id`,
`memory_results.memories`, …), echo `_reqId` when given, and names default to "unknown".
`recall` keeps memories whose content or tags contain every word of the query
(case-insensitive), newest first, 20 at most, on SQLite and PostgreSQL alike.
"""
from meshd.broker import protocol, store
from meshd import clock

RECALL_LIMIT = 20
UNKNOWN = 'unknown'


def _with_req(reply, frame):
    req_id = frame.get('_reqId')
    if isinstance(req_id, str):
        reply['_reqId'] = req_id
    return reply


def _member_name(entry):
    member = store.Member.get_or_none(store.Member.id == entry.member_id)
    return member.display_name if member is not None and member.display_name else UNKNOWN


def _invalid(entry, frame, message):
    entry.send(protocol.error('invalid', message, req_id=frame.get('_reqId')
                              if isinstance(frame.get('_reqId'), str) else None))


def _state_view(row):
    return {'key': row.key, 'value': store.loads(row.value, None),
            'updatedBy': row.updated_by_name or UNKNOWN,
            'updatedAt': protocol.iso(row.updated_at)}


class DataVerbs(object):
    """Handlers `(entry, frame)` for the state, memory and skill verbs; `registry` for fan-out."""

    def __init__(self, registry):
        self.registry = registry

    def handlers(self):
        return {'set_state': self.set_state, 'get_state': self.get_state,
                'list_state': self.list_state, 'remember': self.remember, 'recall': self.recall,
                'forget': self.forget, 'share_skill': self.share_skill,
                'list_skills': self.list_skills, 'get_skill': self.get_skill,
                'remove_skill': self.remove_skill}

    # ------------------------------------------------------------------ state

    def set_state(self, entry, frame):
        key = frame.get('key')
        if not isinstance(key, str) or not key:
            return _invalid(entry, frame, 'key required')
        value = frame.get('value')
        name = _member_name(entry)
        S = store.MeshState
        fields = dict(value=store.dumps(value), updated_by_presence=entry.presence_id,
                      updated_by_name=name, updated_at=clock.utcnow())
        with store.writing():
            if not S.update(**fields).where((S.mesh_id == entry.mesh_id) & (S.key == key)).execute():
                S.create(mesh_id=entry.mesh_id, key=key, **fields)
        change = {'type': 'state_change', 'key': key, 'value': value, 'updatedBy': name}
        for other in self.registry.live(entry.mesh_id):
            if other is not entry:
                other.send(change)

    def get_state(self, entry, frame):
        key = frame.get('key')
        S = store.MeshState
        row = S.get_or_none((S.mesh_id == entry.mesh_id) & (S.key == key)) if isinstance(key, str) else None
        if row is None:
            reply = {'type': 'state_result', 'key': key, 'value': None, 'updatedBy': '', 'updatedAt': ''}
        else:
            reply = dict({'type': 'state_result'}, **_state_view(row))
        entry.send(_with_req(reply, frame))

    def list_state(self, entry, frame):
        S = store.MeshState
        rows = S.select().where(S.mesh_id == entry.mesh_id).order_by(S.key)
        entry.send(_with_req({'type': 'state_list', 'entries': [_state_view(r) for r in rows]}, frame))

    # ------------------------------------------------------------------ memory

    def remember(self, entry, frame):
        content = frame.get('content')
        if not isinstance(content, str) or not content:
            return _invalid(entry, frame, 'content required')
        tags = frame.get('tags') if isinstance(frame.get('tags'), list) else []
        memory_id = protocol.new_id()
        with store.writing():
            store.Memory.create(id=memory_id, mesh_id=entry.mesh_id, content=content,
                                tags=store.dumps([str(t) for t in tags]),
                                remembered_by=entry.member_id, remembered_by_name=_member_name(entry),
                                remembered_at=clock.utcnow())
        entry.send(_with_req({'type': 'memory_stored', 'id': memory_id}, frame))

    def recall(self, entry, frame):
        query = frame.get('query') if isinstance(frame.get('query'), str) else ''
        words = [w.lower() for w in query.split() if w]
        M = store.Memory
        rows = (M.select()
                .where((M.mesh_id == entry.mesh_id) & M.forgotten_at.is_null())
                .order_by(M.remembered_at.desc(), M.id.desc()))
        memories = []
        for row in rows:
            haystack = (row.content + ' ' + ' '.join(store.loads(row.tags, []))).lower()
            if all(w in haystack for w in words):
                memories.append({'id': row.id, 'content': row.content,
                                 'tags': store.loads(row.tags, []),
                                 'rememberedBy': row.remembered_by_name or UNKNOWN,
                                 'rememberedAt': protocol.iso(row.remembered_at)})
                if len(memories) >= RECALL_LIMIT:
                    break
        entry.send(_with_req({'type': 'memory_results', 'memories': memories}, frame))

    def forget(self, entry, frame):
        memory_id = frame.get('memoryId')
        if isinstance(memory_id, str):
            M = store.Memory
            with store.writing():
                (M.update(forgotten_at=clock.utcnow())
                 .where((M.id == memory_id) & (M.mesh_id == entry.mesh_id) & M.forgotten_at.is_null())
                 .execute())
        entry.send(_with_req({'type': 'ack', 'id': memory_id, 'messageId': memory_id,
                              'queued': False}, frame))

    # ------------------------------------------------------------------ skills

    def share_skill(self, entry, frame):
        name = frame.get('name')
        if not isinstance(name, str) or not name:
            return _invalid(entry, frame, 'name required')
        K = store.Skill
        now = clock.utcnow()
        tags = frame.get('tags') if isinstance(frame.get('tags'), list) else []
        fields = dict(description=str(frame.get('description') or ''),
                      instructions=str(frame.get('instructions') or ''),
                      tags=store.dumps([str(t) for t in tags]),
                      manifest=store.dumps(frame['manifest']) if frame.get('manifest') is not None else None,
                      author_member_id=entry.member_id, author_name=_member_name(entry),
                      updated_at=now)
        with store.writing():
            if not K.update(**fields).where((K.mesh_id == entry.mesh_id) & (K.name == name)).execute():
                K.create(id=protocol.new_id(), mesh_id=entry.mesh_id, name=name, created_at=now,
                         **fields)
        entry.send(_with_req({'type': 'skill_ack', 'name': name, 'action': 'shared'}, frame))

    def list_skills(self, entry, frame):
        query = frame.get('query') if isinstance(frame.get('query'), str) else ''
        K = store.Skill
        skills = []
        for row in K.select().where(K.mesh_id == entry.mesh_id).order_by(K.name):
            tags = store.loads(row.tags, [])
            if query and not any(query.lower() in text.lower()
                                 for text in [row.name, row.description] + tags):
                continue
            skills.append({'name': row.name, 'description': row.description, 'tags': tags,
                           'author': row.author_name or UNKNOWN,
                           'createdAt': protocol.iso(row.created_at)})
        entry.send(_with_req({'type': 'skill_list', 'skills': skills}, frame))

    def get_skill(self, entry, frame):
        K = store.Skill
        name = frame.get('name')
        row = K.get_or_none((K.mesh_id == entry.mesh_id) & (K.name == name)) if isinstance(name, str) else None
        skill = None
        if row is not None:
            skill = {'name': row.name, 'description': row.description,
                     'instructions': row.instructions, 'tags': store.loads(row.tags, []),
                     'author': row.author_name or UNKNOWN, 'manifest': store.loads(row.manifest, None),
                     'createdAt': protocol.iso(row.created_at)}
        entry.send(_with_req({'type': 'skill_data', 'skill': skill}, frame))

    def remove_skill(self, entry, frame):
        K = store.Skill
        name = frame.get('name')
        removed = 0
        if isinstance(name, str):
            with store.writing():
                removed = K.delete().where((K.mesh_id == entry.mesh_id) & (K.name == name)).execute()
        entry.send(_with_req({'type': 'skill_ack', 'name': name,
                              'action': 'removed' if removed else 'not_found'}, frame))

