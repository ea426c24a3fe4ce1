"""The broker's database: peewee models, migrations, the write lock (spec/wire.md §11.5).

SQLite by default (WAL, synchronous=FULL, the file created 0600 in a 0700 directory because it
holds the mesh owners' secret keys); PostgreSQL when given a `postgresql://` URL, through a pooled
database with psycogreen so queries yield to the gevent hub. psycopg2 is imported only on that
path, so the daemon and an SQLite broker start without it.

Every write goes through `writing()`: one process-wide cooperative lock around the transaction
(STYLE.md fact 1), and callers never touch a socket inside it. The message paths submit their
writes to `writer`, which commits the writes queued together in one transaction. Connections are per greenlet
(`connection()`), never `:memory:`. One broker process owns its database: the models are bound
to one module-level proxy, initialised by `open_store()`.
"""
import contextlib
import fcntl
import json
import logging
import os
import urllib.parse

import gevent.lock
import peewee
from playhouse.pool import PooledSqliteDatabase

from meshd.exceptions import StorageError
from storage.group_commit import GroupWriter

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
SCHEMA_TABLE = 'meshd_schema'
PG_ADVISORY_KEY = 0x6d657368  # "mesh": serialises migrations of concurrent starters
# Pages are read through a shared mapping: each pooled connection rereads pages another one
# changed, and with pread that was dozens of system calls per queued message.
MMAP_BYTES = 256 * 1024 * 1024

database = peewee.DatabaseProxy()
write_lock = gevent.lock.RLock()


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


# ----------------------------------------------------------------------------- models

class BaseModel(peewee.Model):
    """Base of the broker's models; ids are 32-character base62 strings."""

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


class MessageQueue(BaseModel):
    """A queued message: DMs wait here until a client_ack; multicast rows are delivered at once."""
    id = peewee.CharField(primary_key=True, max_length=40)
    mesh_id = peewee.CharField(max_length=40)
    sender_member_id = peewee.CharField(max_length=40)
    sender_session_pubkey = peewee.CharField(max_length=64, null=True)
    target_spec = peewee.TextField()
    priority = peewee.CharField(max_length=8)
    nonce = peewee.TextField()
    ciphertext = peewee.TextField()
    created_at = peewee.DateTimeField()
    delivered_at = peewee.DateTimeField(null=True)
    expires_at = peewee.DateTimeField()
    client_message_id = peewee.TextField(null=True)
    request_fingerprint = peewee.TextField(null=True)
    claimed_at = peewee.DateTimeField(null=True)
    claim_id = peewee.CharField(max_length=40, null=True)
    claim_expires_at = peewee.DateTimeField(null=True)
    # Schema 3: a DM that can no longer be delivered (expired, recipient removed) and
    # whether its sender's daemon has been told (meshd extension `undelivered`).
    undelivered_at = peewee.DateTimeField(null=True)
    undelivered_reason = peewee.TextField(null=True)
    sender_notified_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = 'message_queue'
        # The drain reads (mesh, undelivered, target) in created order; idempotency reads by
        # client_message_id; release by claim_id; the TTL sweep by expires_at; the notices
        # of undelivered DMs by sender.
        indexes = ((('mesh_id', 'delivered_at', 'target_spec'), False),
                   (('client_message_id',), False), (('claim_id',), False),
                   (('expires_at',), False), (('delivered_at',), False),
                   (('sender_member_id', 'undelivered_at'), False))


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


MODELS_V1 = [Mesh, Member, Invite, Presence, MessageQueue, PeerState]
MODELS_V2 = [MeshState, Memory, Skill, PendingStatus]
MODELS = MODELS_V1 + MODELS_V2


# ----------------------------------------------------------------------------- migrations

def _create_initial(db):
    # Version 1: identity, presence and queue tables. A later change adds a numbered step that
    # alters the tables instead of editing these models' v1 shape.
    db.create_tables(MODELS_V1, safe=True)


def _create_daemon_data(db):
    # Version 2: the tables behind the daemon's state, memory and skills verbs (§4.4) and the
    # hook statuses that arrive before their presence (§9.4).
    db.create_tables(MODELS_V2, safe=True)


_UNDELIVERED_COLUMNS = (('undelivered_at', 'DATETIME', 'TIMESTAMP'),
                        ('undelivered_reason', 'TEXT', 'TEXT'),
                        ('sender_notified_at', 'DATETIME', 'TIMESTAMP'))


def _add_undelivered(db):
    # Version 3: DMs the broker gives up on are kept, with a reason, until their sender's
    # daemon was told. Version 1 creates its tables from the live models, so on a fresh
    # database the columns may exist already.
    present = {column.name for column in db.get_columns('message_queue')}
    for name, sqlite_type, pg_type in _UNDELIVERED_COLUMNS:
        if name not in present:
            db.execute_sql('ALTER TABLE message_queue ADD COLUMN %s %s'
                           % (name, pg_type if _is_postgres(db) else sqlite_type))
    db.execute_sql('CREATE INDEX IF NOT EXISTS message_queue_sender_member_id_undelivered_at '
                   'ON message_queue (sender_member_id, undelivered_at)')


MIGRATIONS = [(1, _create_initial), (2, _create_daemon_data), (3, _add_undelivered)]
HEAD = MIGRATIONS[-1][0]


def _is_postgres(db):
    return isinstance(db, peewee.PostgresqlDatabase)


def schema_version(db=None):
    """The schema number stored in the database (0 for an empty database)."""
    db = db or database.obj
    if _is_postgres(db):
        if SCHEMA_TABLE not in db.get_tables():
            return 0
        row = db.execute_sql('SELECT version FROM %s' % SCHEMA_TABLE).fetchone()
        return row[0] if row else 0
    return db.execute_sql('PRAGMA user_version').fetchone()[0]


def _set_version(db, version):
    if _is_postgres(db):
        db.execute_sql('CREATE TABLE IF NOT EXISTS %s (version integer NOT NULL)' % SCHEMA_TABLE)
        db.execute_sql('DELETE FROM %s' % SCHEMA_TABLE)
        db.execute_sql('INSERT INTO %s (version) VALUES (%%s)' % SCHEMA_TABLE, (version,))
    else:
        db.execute_sql('PRAGMA user_version = %d' % int(version))


def migrate(db=None):
    """Bring the schema to HEAD; raise StorageError when the database is newer than the code."""
    db = db or database.obj
    with connection():
        if _is_postgres(db):
            db.execute_sql('SELECT pg_advisory_lock(%s)', (PG_ADVISORY_KEY,))
        try:
            current = schema_version(db)
            if current > HEAD:
                raise StorageError('broker database schema %d is newer than this meshd (%d)'
                                   % (current, HEAD))
            for number, step in MIGRATIONS:
                if number <= current:
                    continue
                with writing():
                    step(db)
                    _set_version(db, number)
                log.info('broker database migrated to schema %d', number)
        finally:
            if _is_postgres(db):
                db.execute_sql('SELECT pg_advisory_unlock(%s)', (PG_ADVISORY_KEY,))


# ----------------------------------------------------------------------------- opening

_pg_patched = False


def default_path():
    """`$MESHD_HOME/broker/broker.db` (`~/.meshd/broker/broker.db`)."""
    home = os.environ.get('MESHD_HOME') or os.path.join(os.path.expanduser('~'), '.meshd')
    return os.path.join(home, 'broker', 'broker.db')


def sqlite_path(url):
    """The file path of an SQLite `--db` value (a path or sqlite:///path), or None for PostgreSQL."""
    if url.startswith(('postgresql://', 'postgres://')):
        return None
    if url.startswith('sqlite:///'):
        # SQLAlchemy's convention: sqlite:///rel/path, sqlite:////abs/path.
        return url[len('sqlite:///'):]
    if '://' in url:
        raise StorageError('unsupported database URL: %s' % url.split('://', 1)[0])
    return url


def _prepare_sqlite_file(path):
    # The file holds owner secret keys: create directory and file with their modes, never chmod.
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=DIR_MODE)
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.close(fd)


def _open_sqlite(path):
    if path == ':memory:' or not path:
        raise StorageError('the broker needs a database file, not :memory:')
    _prepare_sqlite_file(path)
    # The -wal and -shm companions inherit nothing from the main file; a umask keeps them private.
    old = os.umask(0o077)
    try:
        # Pooled: with a plain database every frame opened and closed a connection, and the
        # close of the last one checkpointed and deleted the WAL, an fsync storm per frame.
        db = PooledSqliteDatabase(path, max_connections=64, timeout=10, pragmas={
            'journal_mode': 'wal', 'synchronous': 'full', 'foreign_keys': 1,
            'busy_timeout': 5000, 'mmap_size': MMAP_BYTES})
        db.connect()
        db.close()
    finally:
        os.umask(old)
    return db


def _open_postgres(url):
    global _pg_patched
    try:
        # Optional dependencies, imported on this path only (psycogreen imports psycopg2).
        import psycogreen.gevent
        from playhouse.pool import PooledPostgresqlDatabase
    except ImportError as exc:
        raise StorageError('PostgreSQL needs psycopg2 and psycogreen: %s' % exc)
    if not _pg_patched:
        psycogreen.gevent.patch_psycopg()
        _pg_patched = True
    parsed = urllib.parse.urlparse(url)
    name = parsed.path.lstrip('/')
    if not name:
        raise StorageError('database URL has no database name')
    # A greenlet waits up to 10 s for a pooled connection instead of failing at once.
    kwargs = {'max_connections': 64, 'stale_timeout': 300, 'timeout': 10}
    if parsed.hostname:
        kwargs['host'] = parsed.hostname
    if parsed.port:
        kwargs['port'] = parsed.port
    if parsed.username:
        kwargs['user'] = urllib.parse.unquote(parsed.username)
    if parsed.password:
        kwargs['password'] = urllib.parse.unquote(parsed.password)
    return PooledPostgresqlDatabase(name, **kwargs)


def open_store(url=None, migrate_schema=True):
    """Open the broker database named by `url` (path, sqlite:/// or postgresql://) and migrate it.

    Returns the peewee database, which is also bound to every model.
    """
    url = url or default_path()
    path = sqlite_path(url)
    try:
        db = _open_sqlite(path) if path is not None else _open_postgres(url)
        database.initialize(db)
        if migrate_schema:
            migrate(db)
    except StorageError:
        raise
    except peewee.PeeweeException as exc:
        raise StorageError('cannot open broker database: %s' % exc)
    return db


def acquire_instance_lock(url):
    """Hold an exclusive flock next to an SQLite database; return the open file, or None for
    PostgreSQL. Leases and connections live in one process's memory, so a second broker on the
    same database is refused (field lesson 79)."""
    path = sqlite_path(url or default_path())
    if path is None:
        return None
    lock_path = path + '.lock'
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StorageError('another meshd broker is using %s (single node only)' % path)
    return fd


def release_instance_lock(fd):
    """Release the lock taken by acquire_instance_lock()."""
    if fd is not None:
        os.close(fd)


def close_store():
    """Close the current greenlet's connection and, for a pool, every pooled connection."""
    db = database.obj
    if db is None:
        return
    if not db.is_closed():
        db.close()
    close_all = getattr(db, 'close_all', None)
    if close_all is not None:
        close_all()


@contextlib.contextmanager
def connection():
    """Use this greenlet's connection, opening it (and closing it afterwards) when needed.

    Unlike peewee's connection_context() this nests: an inner block never closes the
    connection an outer block opened.
    """
    db = database.obj
    opened = db.is_closed()
    if opened:
        db.connect()
    try:
        yield db
    finally:
        if opened and not db.is_closed():
            db.close()


@contextlib.contextmanager
def writing():
    """One write transaction under the process-wide cooperative lock (no socket I/O inside)."""
    with write_lock:
        with connection() as db:
            with db.atomic():
                yield db


# The broker's one writer greenlet (started and stopped by BrokerServer): inserts, claims and
# acks queued while a commit runs share the next one, instead of a commit each.
writer = GroupWriter(database, writing, write_lock._is_owned, name='broker writer')


def execute(sql, params=()):
    """Run hand-written SQL (with `?` placeholders on either backend) on this greenlet's
    connection. The per-message paths use it: building a peewee query cost more than running it.
    """
    db = database.obj
    if db.param != '?':
        sql = sql.replace('%', '%%').replace('?', db.param)  # psycopg2's format style
    return db.execute_sql(sql, params)


def ping():
    """True when the database answers a trivial query (for GET /health)."""
    try:
        with connection() as db:
            db.execute_sql('SELECT 1').fetchone()
        return True
    except Exception:
        log.warning('database health check failed', exc_info=True)
        return False


def drop_all(db=None):
    """Drop every broker table (tests only: a clean PostgreSQL schema per test)."""
    db = db or database.obj
    with connection():
        db.drop_tables(MODELS, safe=True)
        if _is_postgres(db):
            db.execute_sql('DROP TABLE IF EXISTS %s' % SCHEMA_TABLE)
