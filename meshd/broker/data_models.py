"""The tables of what a mesh shares: state, memories and skills (spec/wire.md §4.4)."""
import peewee

from meshd.broker.models import BaseModel, dumps, loads


class MeshState(BaseModel):
    """Shared key/value state of a mesh (set_state, get_state, list_state)."""
    mesh_id = peewee.CharField(max_length=40)
    key = peewee.TextField()
    value = peewee.TextField(null=True)
    updated_by_presence = peewee.CharField(max_length=40, null=True)
    updated_by_name = peewee.TextField(null=True)
    updated_at = peewee.DateTimeField()

    class Meta:
        table_name = 'state'
        indexes = ((('mesh_id', 'key'), True),)

    @classmethod
    def put(cls, mesh_id, key, value, presence_id, name, now):
        """Set `key` of a mesh to `value` (inserted or replaced)."""
        fields = dict(value=dumps(value), updated_by_presence=presence_id, updated_by_name=name,
                      updated_at=now)
        if not cls.update(**fields).where((cls.mesh_id == mesh_id) & (cls.key == key)).execute():
            cls.create(mesh_id=mesh_id, key=key, **fields)

    @classmethod
    def get_key(cls, mesh_id, key):
        return cls.get_or_none((cls.mesh_id == mesh_id) & (cls.key == key))

    @classmethod
    def all_of(cls, mesh_id):
        return list(cls.select().where(cls.mesh_id == mesh_id).order_by(cls.key))


class Memory(BaseModel):
    """A remembered note of a mesh (remember, recall, forget; soft-deleted)."""
    id = peewee.CharField(primary_key=True, max_length=40)
    mesh_id = peewee.CharField(max_length=40)
    content = peewee.TextField()
    tags = peewee.TextField(default='[]')
    remembered_by = peewee.CharField(max_length=40, null=True)
    remembered_by_name = peewee.TextField(null=True)
    remembered_at = peewee.DateTimeField()
    forgotten_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = 'memory'
        indexes = ((('mesh_id', 'remembered_at'), False),)

    @classmethod
    def remember(cls, memory_id, mesh_id, content, tags, member_id, name, now):
        cls.create(id=memory_id, mesh_id=mesh_id, content=content, tags=dumps(tags),
                   remembered_by=member_id, remembered_by_name=name, remembered_at=now)

    @classmethod
    def recall(cls, mesh_id, words, limit):
        """Memories whose content or tags contain every word (case-insensitive), newest
        first, at most `limit`; the same on SQLite and PostgreSQL."""
        found = []
        for row in (cls.select()
                    .where((cls.mesh_id == mesh_id) & cls.forgotten_at.is_null())
                    .order_by(cls.remembered_at.desc(), cls.id.desc())):
            haystack = (row.content + ' ' + ' '.join(loads(row.tags, []))).lower()
            if all(word in haystack for word in words):
                found.append(row)
                if len(found) >= limit:
                    break
        return found

    @classmethod
    def forget(cls, memory_id, mesh_id, now):
        return (cls.update(forgotten_at=now)
                .where((cls.id == memory_id) & (cls.mesh_id == mesh_id)
                       & cls.forgotten_at.is_null())
                .execute())


class Skill(BaseModel):
    """A shared skill of a mesh (share_skill, list_skills, get_skill, remove_skill)."""
    id = peewee.CharField(primary_key=True, max_length=40)
    mesh_id = peewee.CharField(max_length=40)
    name = peewee.TextField()
    description = peewee.TextField(default='')
    instructions = peewee.TextField(default='')
    tags = peewee.TextField(default='[]')
    manifest = peewee.TextField(null=True)
    author_member_id = peewee.CharField(max_length=40, null=True)
    author_name = peewee.TextField(null=True)
    created_at = peewee.DateTimeField()
    updated_at = peewee.DateTimeField()

    class Meta:
        table_name = 'skill'
        indexes = ((('mesh_id', 'name'), True),)

    @classmethod
    def share(cls, new_id, mesh_id, name, now, **fields):
        """Publish or replace the skill `name` of a mesh."""
        fields['updated_at'] = now
        if not cls.update(**fields).where((cls.mesh_id == mesh_id) & (cls.name == name)).execute():
            cls.create(id=new_id, mesh_id=mesh_id, name=name, created_at=now, **fields)

    @classmethod
    def named(cls, mesh_id, name):
        return cls.get_or_none((cls.mesh_id == mesh_id) & (cls.name == name))

    @classmethod
    def all_of(cls, mesh_id):
        return list(cls.select().where(cls.mesh_id == mesh_id).order_by(cls.name))

    @classmethod
    def remove(cls, mesh_id, name):
        return cls.delete().where((cls.mesh_id == mesh_id) & (cls.name == name)).execute()
