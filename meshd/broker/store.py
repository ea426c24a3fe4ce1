"""Opening the broker's database (spec/wire.md §11.5): which file or server, and one owner.

SQLite by default (WAL, synchronous=FULL, the file created 0600 in a 0700 directory because
it holds the mesh owners' secret keys); PostgreSQL when given a `postgresql://` URL, pooled,
with psycogreen so queries yield to the gevent hub (psycopg2 is imported on that path only).
Both through storage.Store, the engine the daemon uses too, and migrated with the frozen
SQL of meshd/broker/migrations.py. One broker process owns an SQLite database: a second one
is refused by a flock next to the file.
"""
import fcntl
import os

from storage import migrate
from storage.errors import StorageError
from storage.store import Store

from meshd.broker import migrations
from meshd.broker.data_models import Memory, MeshState, Skill
from meshd.broker.message_queue import MessageQueue
from meshd.broker.models import CORE_MODELS, database

FILE_MODE = 0o600
MODELS = CORE_MODELS + [MessageQueue, MeshState, Memory, Skill]


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


def new_store():
    """A broker Store, not opened yet (the broker builds its parts before it starts)."""
    return Store(database, name='broker writer')


def open_store(url=None, migrate_schema=True, store=None):
    """Open `store` (a new one when None) on `url` (a path, sqlite:/// or postgresql://),
    migrated; return it."""
    url = url or default_path()
    path = sqlite_path(url)
    store = store or new_store()
    if path is not None:
        store.open_sqlite(path)
    else:
        store.open_postgres(url)
    if migrate_schema:
        migrate.migrate(store, migrations.MIGRATIONS, what='broker database')
    return store


def acquire_instance_lock(url):
    """Hold an exclusive flock next to an SQLite database; return the open file, or None for
    PostgreSQL. Leases and connections live in one process's memory, so a second broker on
    the same database is refused (field lesson 79)."""
    path = sqlite_path(url or default_path())
    if path is None:
        return None
    fd = os.open(path + '.lock', os.O_RDWR | os.O_CREAT, FILE_MODE)
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


def drop_all(store):
    """Drop every broker table (tests only: a clean PostgreSQL schema per test)."""
    with store.connection() as db:
        db.drop_tables(MODELS, safe=True)
        if store.is_postgres:
            db.execute_sql('DROP TABLE IF EXISTS %s' % migrate.SCHEMA_TABLE)
