"""The daemon's database object, its pragmas and its single write path.

The database is deferred: `open_database()` initialises it at start-up, never at import
(DESIGN.md 5). Under gevent every write takes one cooperative lock around the transaction:
SQLite's busy handler sleeps in C, so without the lock a second writer would freeze the
whole hub until `busy_timeout` expires (STYLE.md fact 1). Connections are per greenlet
(peewee keeps them in a patched threading.local), so `:memory:` is never an option; they
come from a pool, because a handler greenlet that opened its own connection for every call
spent more time in connect and pragmas than in its query.

`writer` is the one writer greenlet of DESIGN.md 19 (storage/group_commit.py): writes
submitted while a commit is running are committed together in the next transaction, each in
its own savepoint, so that one fsync serves many of them under `synchronous=FULL`.
"""
import contextlib
import os

import gevent
import gevent.lock
from playhouse.pool import PooledSqliteDatabase

from storage import group_commit

DURABILITY_SYNCHRONOUS = {'full': 'full', 'normal': 'normal'}
BUSY_TIMEOUT_MS = 5000

MAX_CONNECTIONS = 64
MMAP_BYTES = 256 * 1024 * 1024

db = PooledSqliteDatabase(None)
write_lock = gevent.lock.RLock()


class StorageError(Exception):
    """The database cannot be opened, migrated or written."""


def create_private_file(path):
    """Create `path` with mode 0600 if it does not exist, so SQLite never makes it wider.

    SQLite gives the -wal and -shm files the database file's mode, so creating the main
    file first with the final mode keeps every file of the database private.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def pragmas(durability='full'):
    """The pragmas every connection of a meshd database runs with (DESIGN.md 19)."""
    if durability not in DURABILITY_SYNCHRONOUS:
        raise StorageError('unknown durability %r (expected full or normal)' % (durability,))
    return {
        'journal_mode': 'wal',
        'synchronous': DURABILITY_SYNCHRONOUS[durability],
        'foreign_keys': 1,
        'busy_timeout': BUSY_TIMEOUT_MS,
        # Pages are read through a shared mapping, not a pread() each: every pooled
        # connection rereads the pages another connection changed.
        'mmap_size': MMAP_BYTES,
    }


def open_database(path, durability='full', database=db):
    """Initialise `database` on the file at `path` (created 0600) and connect this greenlet."""
    create_private_file(path)
    # timeout: how long a greenlet waits for a free pooled connection (0 would mean forever).
    database.init(path, max_connections=MAX_CONNECTIONS, timeout=30,
                  pragmas=pragmas(durability))
    database.connect(reuse_if_open=True)
    return database


def close_database(database=db):
    """Return this greenlet's connection, then close every pooled connection."""
    if not database.is_closed():
        database.close()
    database.close_all()


@contextlib.contextmanager
def reading(database=db):
    """A connection for this greenlet for the duration of the block (WAL readers need no lock)."""
    if database.is_closed():
        with database.connection_context():
            yield
    else:
        yield


_writers = {}  # greenlet -> depth of writing() blocks it is inside


@contextlib.contextmanager
def writing(database=db):
    """One write transaction under the cooperative write lock.

    Nothing inside the block may touch a socket: read, commit, release, then send. The lock
    is re-entrant, so a nested `writing()` in the same greenlet becomes a savepoint.
    """
    current = gevent.getcurrent()
    with write_lock:
        _writers[current] = _writers.get(current, 0) + 1
        try:
            with reading(database), database.atomic('IMMEDIATE'):
                yield
        finally:
            _writers[current] -= 1
            if not _writers[current]:
                del _writers[current]


def in_write():
    """True inside a writing() block of this greenlet (its statements join that transaction)."""
    return gevent.getcurrent() in _writers


BatchAborted = group_commit.BatchAborted


# The daemon's one writer greenlet (DESIGN.md 19), started by the daemon's supervisor.
writer = group_commit.GroupWriter(db, writing, in_write)


def write(fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` in the shared group-committed transaction; return its result."""
    return writer.write(fn, *args, **kwargs)
