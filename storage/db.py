"""The daemon's database object, its pragmas and its single write path.

The database is deferred: `open_database()` initialises it at start-up, never at import
(DESIGN.md 5). Under gevent every write takes one cooperative lock around the transaction:
SQLite's busy handler sleeps in C, so without the lock a second writer would freeze the
whole hub until `busy_timeout` expires (STYLE.md fact 1). Connections are per greenlet
(peewee keeps them in a patched threading.local), so `:memory:` is never an option; they
come from a pool, because a handler greenlet that opened its own connection for every call
spent more time in connect and pragmas than in its query.

`GroupWriter` is the one writer greenlet of DESIGN.md 19: writes submitted while a commit
is running are committed together in the next transaction, each in its own savepoint, so
that one fsync serves many of them under `synchronous=FULL`.
"""
import contextlib
import os

import gevent
import gevent.event
import gevent.lock
import gevent.queue
from playhouse.pool import PooledSqliteDatabase

DURABILITY_SYNCHRONOUS = {'full': 'full', 'normal': 'normal'}
BUSY_TIMEOUT_MS = 5000

MAX_CONNECTIONS = 64
MAX_BATCH = 128

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


class BatchAborted(StorageError):
    """SQLite rolled the whole group transaction back (disk full, I/O error)."""


_STOP = object()


class GroupWriter:
    """One greenlet that runs submitted writes, committing those queued together at once.

    `write(fn, *args)` runs `fn` inside a transaction and returns its result once the
    transaction has committed (or raises what `fn` raised; a failed `fn` is rolled back to
    its savepoint without touching the others). Nested calls from inside a write run
    inline. Before `run()` starts and after `stop()`, writes run directly under `writing()`.
    """

    def __init__(self, database=db, max_batch=MAX_BATCH):
        self.database = database
        self.max_batch = max_batch
        self._queue = gevent.queue.Queue()
        self._greenlet = None
        self._stopped = gevent.event.Event()

    def write(self, fn, *args, **kwargs):
        current = gevent.getcurrent()
        # Inline: before the writer runs, after it stopped, from the writer itself, or from a
        # greenlet already inside writing() (queuing would wait on the lock it holds).
        if (self._greenlet is None or current is self._greenlet or self._stopped.is_set()
                or current in _writers):
            with writing(self.database):
                return fn(*args, **kwargs)
        result = gevent.event.AsyncResult()
        self._queue.put((fn, args, kwargs, result))
        return result.get()

    def run(self):
        """The writer loop; returns after `stop()` once the queue is empty."""
        self._greenlet = gevent.getcurrent()
        self._stopped.clear()
        try:
            while True:
                job = self._queue.get()
                if job is _STOP:
                    return
                batch = [job]
                while len(batch) < self.max_batch and not self._queue.empty():
                    following = self._queue.get_nowait()
                    if following is _STOP:
                        self._queue.put(_STOP)
                        break
                    batch.append(following)
                self._commit(batch)
        finally:
            self._stopped.set()
            self._greenlet = None
            self._run_queued()

    def _commit(self, batch):
        try:
            self._commit_batch(batch)
        except BaseException:
            # Killed mid-batch (shutdown): nobody may wait forever on a result.
            for _fn, _args, _kwargs, result in batch:
                if not result.ready():
                    result.set_exception(RuntimeError('database writer stopped'))
            raise

    def _commit_batch(self, batch):
        outcomes = []
        try:
            with writing(self.database):
                connection = self.database.connection()
                for fn, args, kwargs, _result in batch:
                    try:
                        with self.database.atomic():  # a savepoint: a failure stays its own
                            outcomes.append((True, fn(*args, **kwargs)))
                    except Exception as exc:
                        if not connection.in_transaction:
                            # Disk full or an I/O error rolled back the whole transaction:
                            # the writes before this one are gone too.
                            raise BatchAborted('write transaction rolled back: %s' % exc)
                        outcomes.append((False, exc))
        except Exception as exc:
            for _fn, _args, _kwargs, result in batch:
                result.set_exception(exc)
            return
        for (ok, value), (_fn, _args, _kwargs, result) in zip(outcomes, batch):
            if ok:
                result.set(value)
            else:
                result.set_exception(value)

    def _run_queued(self):
        """After the loop ends, run what is still queued directly, each in its own transaction."""
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is _STOP:
                continue
            fn, args, kwargs, result = job
            try:
                with writing(self.database):
                    result.set(fn(*args, **kwargs))
            except Exception as exc:
                result.set_exception(exc)

    def stop(self, timeout=10):
        """Finish the writes already queued, then stop the loop."""
        if self._greenlet is not None:
            self._queue.put(_STOP)
            self._stopped.wait(timeout)


writer = GroupWriter()


def write(fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` in the shared group-committed transaction; return its result."""
    return writer.write(fn, *args, **kwargs)
