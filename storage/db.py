"""The daemon's database object, its pragmas and its single write path.

The database is deferred: `open_database()` initialises it at start-up, never at import
(DESIGN.md 5). Under gevent every write takes one cooperative lock around the transaction:
SQLite's busy handler sleeps in C, so without the lock a second writer would freeze the
whole hub until `busy_timeout` expires (STYLE.md fact 1). Connections are per greenlet
(peewee keeps them in a patched threading.local), so `:memory:` is never an option.
"""
import contextlib
import os

import gevent.lock
from peewee import SqliteDatabase

DURABILITY_SYNCHRONOUS = {'full': 'full', 'normal': 'normal'}
BUSY_TIMEOUT_MS = 5000

db = SqliteDatabase(None)
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
    }


def open_database(path, durability='full', database=db):
    """Initialise `database` on the file at `path` (created 0600) and connect this greenlet."""
    create_private_file(path)
    database.init(path, pragmas=pragmas(durability))
    database.connect(reuse_if_open=True)
    return database


def close_database(database=db):
    """Close this greenlet's connection; other greenlets' connections close with the process."""
    if not database.is_closed():
        database.close()


@contextlib.contextmanager
def reading(database=db):
    """A connection for this greenlet for the duration of the block (WAL readers need no lock)."""
    if database.is_closed():
        with database.connection_context():
            yield
    else:
        yield


@contextlib.contextmanager
def writing(database=db):
    """One write transaction under the cooperative write lock.

    Nothing inside the block may touch a socket: read, commit, release, then send. The lock
    is re-entrant, so a nested `writing()` in the same greenlet becomes a savepoint.
    """
    with write_lock, reading(database), database.atomic('IMMEDIATE'):
        yield
