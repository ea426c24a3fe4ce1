"""The daemon-data verbs: shared state, memories and skills (spec/wire.md §4.4).

Replies use the claudemesh broker's real shapes (`state_result`, `memory_stored.id`,
`memory_results.memories`, …), echo `_reqId` when given, and names default to "unknown".
`recall` keeps memories whose content or tags contain every word of the query
(case-insensitive), newest first, 20 at most, on SQLite and PostgreSQL alike.
"""
from meshd import clock
from meshd.broker import protocol
from meshd.broker.data_models import MeshState, Memory, Skill
from meshd.broker.models import Member, dumps, loads

RECALL_LIMIT = 20
UNKNOWN = 'unknown'


def _member_name(entry):
    member = Member.get_or_none(Member.id == entry.member_id)
    return member.display_name if member is not None and member.display_name else UNKNOWN


def _invalid(entry, frame, message):
    entry.send(protocol.error('invalid', message, req_id=protocol.req_id(frame)))


def _state_view(row):
    return {'key': row.key, 'value': loads(row.value, None),
            'updatedBy': row.updated_by_name or UNKNOWN,
            'updatedAt': protocol.iso(row.updated_at)}


class DataVerbs(object):
    """Handlers `(entry, frame)` for the state, memory and skill verbs, on `store`; the
    connection map `presences` is where a state change is fanned out."""

    def __init__(self, store, presences):
        self.store = store
        self.presences = presences

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
        self.store.write(MeshState.put, entry.mesh_id, key, value, entry.presence_id, name,
                         clock.utcnow())
        change = {'type': 'state_change', 'key': key, 'value': value, 'updatedBy': name}
        for other in self.presences.live(entry.mesh_id):
            if other is not entry:
                other.send(change)

    def get_state(self, entry, frame):
        key = frame.get('key')
        row = MeshState.get_key(entry.mesh_id, key) if isinstance(key, str) else None
        if row is None:
            reply = {'type': 'state_result', 'key': key, 'value': None, 'updatedBy': '',
                     'updatedAt': ''}
        else:
            reply = dict({'type': 'state_result'}, **_state_view(row))
        entry.send(protocol.with_req(reply, frame))

    def list_state(self, entry, frame):
        entries = [_state_view(row) for row in MeshState.all_of(entry.mesh_id)]
        entry.send(protocol.with_req({'type': 'state_list', 'entries': entries}, frame))

    # ------------------------------------------------------------------ memory

    def remember(self, entry, frame):
        content = frame.get('content')
        if not isinstance(content, str) or not content:
            return _invalid(entry, frame, 'content required')
        tags = frame.get('tags') if isinstance(frame.get('tags'), list) else []
        memory_id = protocol.new_id()
        self.store.write(Memory.remember, memory_id, entry.mesh_id, content,
                         [str(t) for t in tags], entry.member_id, _member_name(entry),
                         clock.utcnow())
        entry.send(protocol.with_req({'type': 'memory_stored', 'id': memory_id}, frame))

    def recall(self, entry, frame):
        query = frame.get('query') if isinstance(frame.get('query'), str) else ''
        words = [w.lower() for w in query.split() if w]
        memories = [{'id': row.id, 'content': row.content, 'tags': loads(row.tags, []),
                     'rememberedBy': row.remembered_by_name or UNKNOWN,
                     'rememberedAt': protocol.iso(row.remembered_at)}
                    for row in Memory.recall(entry.mesh_id, words, RECALL_LIMIT)]
        entry.send(protocol.with_req({'type': 'memory_results', 'memories': memories}, frame))

    def forget(self, entry, frame):
        memory_id = frame.get('memoryId')
        if isinstance(memory_id, str):
            self.store.write(Memory.forget, memory_id, entry.mesh_id, clock.utcnow())
        entry.send(protocol.with_req({'type': 'ack', 'id': memory_id, 'messageId': memory_id,
                              'queued': False}, frame))

    # ------------------------------------------------------------------ skills

    def share_skill(self, entry, frame):
        name = frame.get('name')
        if not isinstance(name, str) or not name:
            return _invalid(entry, frame, 'name required')
        tags = frame.get('tags') if isinstance(frame.get('tags'), list) else []
        manifest = frame.get('manifest')
        self.store.write(Skill.share, protocol.new_id(), entry.mesh_id, name, clock.utcnow(),
                         description=str(frame.get('description') or ''),
                         instructions=str(frame.get('instructions') or ''),
                         tags=dumps([str(t) for t in tags]),
                         manifest=dumps(manifest) if manifest is not None else None,
                         author_member_id=entry.member_id, author_name=_member_name(entry))
        entry.send(protocol.with_req({'type': 'skill_ack', 'name': name, 'action': 'shared'}, frame))

    def list_skills(self, entry, frame):
        query = frame.get('query') if isinstance(frame.get('query'), str) else ''
        skills = []
        for row in Skill.all_of(entry.mesh_id):
            tags = loads(row.tags, [])
            if query and not any(query.lower() in text.lower()
                                 for text in [row.name, row.description] + tags):
                continue
            skills.append({'name': row.name, 'description': row.description, 'tags': tags,
                           'author': row.author_name or UNKNOWN,
                           'createdAt': protocol.iso(row.created_at)})
        entry.send(protocol.with_req({'type': 'skill_list', 'skills': skills}, frame))

    def get_skill(self, entry, frame):
        name = frame.get('name')
        row = Skill.named(entry.mesh_id, name) if isinstance(name, str) else None
        skill = None
        if row is not None:
            skill = {'name': row.name, 'description': row.description,
                     'instructions': row.instructions, 'tags': loads(row.tags, []),
                     'author': row.author_name or UNKNOWN,
                     'manifest': loads(row.manifest, None),
                     'createdAt': protocol.iso(row.created_at)}
        entry.send(protocol.with_req({'type': 'skill_data', 'skill': skill}, frame))

    def remove_skill(self, entry, frame):
        name = frame.get('name')
        removed = 0
        if isinstance(name, str):
            removed = self.store.write(Skill.remove, entry.mesh_id, name)
        entry.send(protocol.with_req({'type': 'skill_ack', 'name': name,
                              'action': 'removed' if removed else 'not_found'}, frame))
