"""The broker's peewee models, and every statement the broker runs, named (spec/wire.md §9.1).

The models are bound to `database`, a proxy the broker's Store opens on SQLite or
PostgreSQL (meshd/broker/store.py). Each write and each hand-written SQL statement is a
classmethod next to its model, named for what it means; callers run writes through the
store (`store.write(MessageQueue.release_claims, presence_id)`) or inside
`store.writing()`, and never write SQL of their own. Hand-written SQL uses `?`
placeholders on both backends (storage.store.execute). Times are naive UTC datetimes and
ids 32-character base62 strings, both passed in by the caller.
"""
import datetime
import json

import peewee
from storage.store import execute

database = peewee.DatabaseProxy()


def dumps(value):
    """Compact JSON for the TextField columns that hold JSON."""
    return json.dumps(value, separators=(',', ':'), ensure_ascii=False)


def loads(text, default):
    """Parse a JSON column, falling back to `default` for NULL or garbage."""
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def as_datetime(value):
    """A timestamp read with hand-written SQL: a datetime on PostgreSQL, text on SQLite."""
    if isinstance(value, datetime.datetime) or value is None:
        return value
    return datetime.datetime.fromisoformat(str(value))


def run_sql(sql, params=()):
    return execute(database, sql, params)


def placeholders(values):
    return ', '.join('?' * len(values))


class BaseModel(peewee.Model):
    class Meta:
        database = database
        legacy_table_names = False


class Mesh(BaseModel):
    """A mesh and its server-held owner keys (the owner key signs invites)."""
    id = peewee.CharField(primary_key=True, max_length=40)
    name = peewee.TextField()
    slug = peewee.CharField(unique=True, max_length=64)
    owner_user_id = peewee.TextField(null=True)
    owner_pubkey = peewee.CharField(max_length=64)
    owner_secret_key = peewee.CharField(max_length=128)
    root_key = peewee.TextField()
    self_editable = peewee.TextField()
    created_at = peewee.DateTimeField()
    archived_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = 'mesh'

    @classmethod
    def live(cls, mesh_id):
        """The mesh of `mesh_id` unless it is archived (an archived mesh counts as absent)."""
        return cls.select().where((cls.id == mesh_id) & cls.archived_at.is_null()).first()

    @classmethod
    def by_ref(cls, ref):
        """A mesh by slug or id."""
        return cls.select().where((cls.slug == ref) | (cls.id == ref)).first()

    @classmethod
    def label(cls, mesh_id):
        """What to call a mesh in a message: its name, slug or id."""
        mesh = cls.get_or_none(cls.id == mesh_id)
        return (mesh.name or mesh.slug or mesh.id) if mesh is not None else mesh_id


class Member(BaseModel):
    """A member identity: an Ed25519 pubkey enrolled in one mesh (the secret never is here)."""
    id = peewee.CharField(primary_key=True, max_length=40)
    mesh_id = peewee.CharField(max_length=40)
    user_id = peewee.TextField(null=True)
    peer_pubkey = peewee.CharField(max_length=64)
    display_name = peewee.TextField()
    role = peewee.CharField(max_length=16, default='member')
    role_tag = peewee.TextField(null=True)
    default_groups = peewee.TextField(default='[]')
    message_mode = peewee.CharField(max_length=16, default='push')
    dashboard_user_id = peewee.TextField(null=True)
    joined_at = peewee.DateTimeField()
    last_seen_at = peewee.DateTimeField(null=True)
    revoked_at = peewee.DateTimeField(null=True)
    peer_grants = peewee.TextField(default='{}')

    class Meta:
        table_name = 'member'
        indexes = ((('mesh_id', 'peer_pubkey'), False),)

    @classmethod
    def active(cls, mesh_id, pubkey):
        """The non-revoked member of `mesh_id` with this exact pubkey, or None."""
        return (cls.select()
                .where((cls.mesh_id == mesh_id) & (cls.peer_pubkey == pubkey)
                       & cls.revoked_at.is_null())
                .first())

    @classmethod
    def any_with_key(cls, mesh_id, pubkey):
        """A member of `mesh_id` with this pubkey, revoked or not, or None."""
        return cls.select().where((cls.mesh_id == mesh_id) & (cls.peer_pubkey == pubkey)).first()

    @classmethod
    def grants_of(cls, member_id):
        """A member's per-sender grants (hand-written: one read per DM)."""
        row = run_sql('SELECT peer_grants FROM member WHERE id = ?', (member_id,)).fetchone()
        return loads(row[0], {}) if row is not None else {}

    @classmethod
    def pubkey_of(cls, member_id):
        member = cls.get_or_none(cls.id == member_id)
        return member.peer_pubkey if member is not None else ''

    @classmethod
    def is_admin(cls, member_id):
        member = cls.get_or_none(cls.id == member_id)
        return member is not None and member.role == 'admin' and member.revoked_at is None

    @classmethod
    def revoked_among(cls, member_ids):
        """The ids among `member_ids` of members who were removed."""
        return {m.id for m in cls.select(cls.id)
                .where(cls.id.in_(list(member_ids)) & cls.revoked_at.is_null(False))}

    @classmethod
    def active_in(cls, mesh_id):
        return list(cls.select().where((cls.mesh_id == mesh_id) & cls.revoked_at.is_null())
                    .order_by(cls.joined_at, cls.id))

    @classmethod
    def banned(cls, mesh_id):
        return list(cls.select().where((cls.mesh_id == mesh_id) & cls.revoked_at.is_null(False))
                    .order_by(cls.revoked_at))

    @classmethod
    def enrol(cls, **fields):
        cls.create(**fields)

    @classmethod
    def revoke(cls, member_id, now):
        return cls.update(revoked_at=now).where(cls.id == member_id).execute()

    @classmethod
    def unrevoke(cls, member_id):
        return cls.update(revoked_at=None).where(cls.id == member_id).execute()

    @classmethod
    def set_grants(cls, member_id, grants):
        return cls.update(peer_grants=dumps(grants)).where(cls.id == member_id).execute()


class Invite(BaseModel):
    """A v1 invite minted by `meshd broker-admin invite`."""
    id = peewee.CharField(primary_key=True, max_length=40)
    mesh_id = peewee.CharField(max_length=40)
    token = peewee.TextField(unique=True)
    token_bytes = peewee.TextField()
    code = peewee.CharField(max_length=16, null=True, unique=True)
    max_uses = peewee.IntegerField(default=1)
    used_count = peewee.IntegerField(default=0)
    role = peewee.CharField(max_length=16, default='member')
    preset = peewee.TextField(default='{}')
    expires_at = peewee.DateTimeField()
    created_by = peewee.TextField(default='broker-admin')
    created_at = peewee.DateTimeField()
    revoked_at = peewee.DateTimeField(null=True)
    version = peewee.IntegerField(default=1)
    capability_v2 = peewee.TextField(null=True)
    claimed_by_pubkey = peewee.TextField(null=True)

    class Meta:
        table_name = 'invite'

    @classmethod
    def take_use(cls, invite_id):
        """Consume one use of an invite that has one left; False when it is exhausted."""
        return bool(cls.update(used_count=cls.used_count + 1)
                    .where((cls.id == invite_id) & (cls.used_count < cls.max_uses))
                    .execute())


class Presence(BaseModel):
    """One row per connection-map entry (reused on reattach)."""
    id = peewee.CharField(primary_key=True, max_length=40)
    member_id = peewee.CharField(max_length=40)
    mesh_id = peewee.CharField(max_length=40)
    session_id = peewee.TextField()
    session_pubkey = peewee.CharField(max_length=64, null=True)
    display_name = peewee.TextField(null=True)
    pid = peewee.BigIntegerField()
    cwd = peewee.TextField()
    status = peewee.CharField(max_length=16, default='idle')
    status_source = peewee.CharField(max_length=16, default='jsonl')
    status_updated_at = peewee.DateTimeField(null=True)
    summary = peewee.TextField(null=True)
    groups = peewee.TextField(default='[]')
    role = peewee.CharField(max_length=16)
    connected_at = peewee.DateTimeField()
    last_ping_at = peewee.DateTimeField()
    disconnected_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = 'presence'
        indexes = ((('session_pubkey',), False), (('disconnected_at',), False),
                   (('mesh_id', 'disconnected_at'), False))

    @classmethod
    def open(cls, **fields):
        cls.create(**fields)

    @classmethod
    def reattach(cls, presence_id, now, cwd, display_name):
        return (cls.update(disconnected_at=None, last_ping_at=now, cwd=cwd,
                           display_name=display_name)
                .where(cls.id == presence_id).execute())

    @classmethod
    def set_fields(cls, presence_id, **fields):
        return cls.update(**fields).where(cls.id == presence_id).execute()

    @classmethod
    def disconnect(cls, presence_id, now):
        return cls.update(disconnected_at=now).where(cls.id == presence_id).execute()

    @classmethod
    def disconnect_all(cls, now):
        """Every presence still connected (the broker starts or stops)."""
        return cls.update(disconnected_at=now).where(cls.disconnected_at.is_null()).execute()

    @classmethod
    def touch(cls, presence_ids, now):
        return cls.update(last_ping_at=now).where(cls.id.in_(list(presence_ids))).execute()

    @classmethod
    def disconnect_stale(cls, known_ids, stale_before, now):
        """Rows without a ping since `stale_before` that no live entry owns (an old process)."""
        where = cls.disconnected_at.is_null() & (cls.last_ping_at < stale_before)
        if known_ids:
            where &= cls.id.not_in(list(known_ids))
        return cls.update(disconnected_at=now).where(where).execute()

    @classmethod
    def stale_among(cls, presence_ids, cutoff):
        return {p.id for p in cls.select(cls.id)
                .where(cls.id.in_(list(presence_ids) or ['']) & (cls.last_ping_at < cutoff))}

    @classmethod
    def roster(cls, mesh_id):
        """The connected presences of a mesh with their member's key and name, oldest first."""
        return list(cls.select(cls, Member.peer_pubkey, Member.display_name.alias('member_name'))
                    .join(Member, on=(cls.member_id == Member.id))
                    .where((Member.mesh_id == mesh_id) & cls.disconnected_at.is_null())
                    .order_by(cls.connected_at, cls.id)
                    .objects())

    @classmethod
    def session_owner(cls, mesh_id, session_pubkey):
        """Member id of a non-revoked member whose session presence used this key, or None."""
        row = (cls.select(cls.member_id)
               .join(Member, on=(cls.member_id == Member.id))
               .where((cls.mesh_id == mesh_id) & (cls.session_pubkey == session_pubkey)
                      & (cls.role == 'session') & Member.revoked_at.is_null())
               .first())
        return row.member_id if row is not None else None

    @classmethod
    def prune(cls, cutoff):
        return (cls.delete()
                .where(cls.disconnected_at.is_null(False) & (cls.disconnected_at < cutoff))
                .execute())


class PeerState(BaseModel):
    """What a member's presence leaves behind (drives `restored*` and `peer_returned`)."""
    mesh_id = peewee.CharField(max_length=40)
    member_id = peewee.CharField(max_length=40)
    groups = peewee.TextField(default='[]')
    profile = peewee.TextField(default='{}')
    visible = peewee.BooleanField(default=True)
    last_summary = peewee.TextField(null=True)
    last_display_name = peewee.TextField(null=True)
    cumulative_stats = peewee.TextField(default='{}')
    last_seen_at = peewee.DateTimeField()

    class Meta:
        table_name = 'peer_state'
        indexes = ((('mesh_id', 'member_id'), True),)

    @classmethod
    def of(cls, mesh_id, member_id):
        return cls.get_or_none((cls.mesh_id == mesh_id) & (cls.member_id == member_id))

    @classmethod
    def remember(cls, mesh_id, member_id, **fields):
        """Insert or update the state of (mesh, member)."""
        if not (cls.update(**fields)
                .where((cls.mesh_id == mesh_id) & (cls.member_id == member_id))
                .execute()):
            cls.create(mesh_id=mesh_id, member_id=member_id, **fields)


class PendingStatus(BaseModel):
    """A hook status that arrived before its presence existed (applied on connect within 10 s)."""
    pid = peewee.BigIntegerField(null=True)
    cwd = peewee.TextField()
    status = peewee.CharField(max_length=16)
    status_source = peewee.CharField(max_length=16, default='hook')
    created_at = peewee.DateTimeField()
    applied_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = 'pending_status'
        indexes = ((('pid', 'cwd'), False),)

    @classmethod
    def record(cls, pid, cwd, status, now):
        cls.create(pid=pid, cwd=cwd, status=status, created_at=now)

    @classmethod
    def take(cls, cwd, pid, since, now):
        """The newest unapplied status for (cwd, pid or any pid) since `since`, marked
        applied; None when there is none."""
        row = (cls.select()
               .where((cls.cwd == cwd) & ((cls.pid == pid) | cls.pid.is_null())
                      & cls.applied_at.is_null() & (cls.created_at > since))
               .order_by(cls.created_at.desc())
               .first())
        if row is not None:
            cls.update(applied_at=now).where(cls.id == row.id).execute()
        return row


# The message queue is in meshd/broker/message_queue.py, the shared-data tables (state,
# memory, skills) in meshd/broker/data_models.py; meshd/broker/store.py lists them all.
CORE_MODELS = [Mesh, Member, Invite, Presence, PeerState, PendingStatus]
