"""One storage engine for the daemon and the broker: a database, its write path, its writer.

A Store wraps a peewee DatabaseProxy that its models are bound to, and opens it on SQLite
(a file created 0600, WAL, pooled connections, reads through mmap) or, for the broker, on
PostgreSQL (pooled, with psycogreen so that queries yield to the gevent hub; psycopg2 is
imported on that path only). Under gevent every write takes one cooperative lock around its
transaction: SQLite's busy handler sleeps in C, so without the lock a second writer would
freeze the whole hub until `busy_timeout` expires (STYLE.md fact 1). Nothing inside a write
may touch a socket: read, commit, release, then send.

`writer` is the one writer greenlet of DESIGN.md 19 (storage/group_commit.py): writes
queued while a commit runs are committed together by the next one. At `full` durability the
WAL is fsynced after each group commit in a real thread (SQLite then runs at NORMAL): the
same guarantee as SQLite's FULL — a committed transaction is on disk before anyone is told —
but the hub runs other greenlets during the fsync instead of freezing for it. Connections are per
greenlet (peewee keeps them in a patched threading.local), so `:memory:` is never an option.
"""
import contextlib
import os
import urllib.parse

import gevent
import gevent.lock
import peewee
from playhouse.pool import PooledSqliteDatabase

from storage.errors import StorageError
from storage.group_commit import GroupWriter

DURABILITIES = ('full', 'normal')
BUSY_TIMEOUT_MS = 5000
SQLITE_CONNECTIONS = 64
POSTGRES_CONNECTIONS = 64
# Pages are read through a shared mapping, not a pread() each: every pooled connection
# rereads the pages another connection changed, and that was dozens of calls per message.
MMAP_BYTES = 256 * 1024 * 1024
POOL_WAIT = 30          # seconds a greenlet waits for a free pooled connection

_psycopg_patched = False


def create_private_file(path):
    """Create `path` with mode 0600 (and its directory 0700) if missing, never wider.

    SQLite gives the -wal and -shm files the database file's mode, so creating the main
    file first with the final mode keeps every file of the database private.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def sqlite_pragmas(durability='full'):
    """The pragmas every connection of a meshd SQLite database runs with (DESIGN.md 19)."""
    if durability not in DURABILITIES:
        raise StorageError('unknown durability %r (expected full or normal)' % (durability,))
    return {'journal_mode': 'wal', 'synchronous': durability, 'foreign_keys': 1,
            'busy_timeout': BUSY_TIMEOUT_MS, 'mmap_size': MMAP_BYTES}


class Store:
    """A database, the lock and the writer greenlet that every write goes through."""

    def __init__(self, database, name='writer'):
        self.database = database            # the DatabaseProxy the models are bound to
        self.lock = gevent.lock.RLock()
        self._writers = {}                  # greenlet -> depth of writing() blocks
        self.writer = GroupWriter(database, self.writing, self.in_write, name=name,
                                  after_commit=self._after_commit)
        self.path = None                    # the SQLite file, None on PostgreSQL
        self._sync_wal = False              # fsync the WAL after commits (full, on SQLite)

    # -- opening -------------------------------------------------------------------------

    def open_sqlite(self, path, durability='full'):
        """Open the SQLite file at `path` (created 0600 in a 0700 directory)."""
        if not path or path == ':memory:':
            raise StorageError('a database file is needed, not :memory:')
        create_private_file(path)
        previous = os.umask(0o077)  # the -wal and -shm companions stay private too
        try:
            sqlite_pragmas(durability)      # checks the name
            # `full` is kept by our own fsync of the WAL, off the hub (_after_commit).
            database = PooledSqliteDatabase(path, max_connections=SQLITE_CONNECTIONS,
                                            timeout=POOL_WAIT,
                                            pragmas=sqlite_pragmas('normal'))
            database.connect()
            database.close()
        except peewee.PeeweeException as exc:
            raise StorageError('cannot open %s: %s' % (path, exc))
        finally:
            os.umask(previous)
        self.database.initialize(database)
        self.path = path
        self._sync_wal = durability == 'full'
        return self

    def _after_commit(self):
        """After a commit and before its writers hear of it: at `full`, sync the WAL's data in
        a real thread (fdatasync, as SQLite's FULL does; it releases the GIL), so other
        greenlets run meanwhile. A WAL that does not exist holds nothing unsynced: a
        checkpoint syncs before it resets the log."""
        if not self._sync_wal:
            return
        wal = self.path + '-wal'

        def fsync():
            try:
                fd = os.open(wal, os.O_RDONLY)
            except FileNotFoundError:
                return
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        gevent.get_hub().threadpool.apply(fsync)

    def open_postgres(self, url, max_connections=POSTGRES_CONNECTIONS):
        """Open the PostgreSQL database of a `postgresql://user:pass@host:port/db` URL."""
        global _psycopg_patched
        try:
            # Optional dependencies, imported on this path only (psycogreen imports psycopg2).
            import psycogreen.gevent
            from playhouse.pool import PooledPostgresqlDatabase
        except ImportError as exc:
            raise StorageError('PostgreSQL needs psycopg2 and psycogreen: %s' % exc)
        if not _psycopg_patched:
            psycogreen.gevent.patch_psycopg()
            _psycopg_patched = True
        parsed = urllib.parse.urlparse(url)
        name = parsed.path.lstrip('/')
        if not name:
            raise StorageError('database URL has no database name')
        kwargs = {'max_connections': max_connections, 'stale_timeout': 300,
                  'timeout': POOL_WAIT}
        for key, value in (('host', parsed.hostname), ('port', parsed.port),
                           ('user', parsed.username), ('password', parsed.password)):
            if value:
                kwargs[key] = urllib.parse.unquote(value) if isinstance(value, str) else value
        self.database.initialize(PooledPostgresqlDatabase(name, **kwargs))
        return self

    @property
    def is_postgres(self):
        return isinstance(self.database.obj, peewee.PostgresqlDatabase)

    def close(self):
        """Return this greenlet's connection, then close every pooled connection."""
        database = self.database.obj
        if database is None:
            return
        if not database.is_closed():
            database.close()
        database.close_all()

    # -- connections and transactions ------------------------------------------------------

    @contextlib.contextmanager
    def connection(self):
        """This greenlet's connection for the block; nests (an inner block never closes the
        connection an outer block opened), unlike peewee's connection_context()."""
        database = self.database.obj
        opened = database.is_closed()
        if opened:
            database.connect()
        try:
            yield database
        finally:
            if opened and not database.is_closed():
                database.close()

    reading = connection  # readers need no lock (WAL, MVCC)

    @contextlib.contextmanager
    def writing(self):
        """One write transaction under the cooperative write lock (no socket I/O inside).

        The lock is re-entrant, so a nested writing() in the same greenlet is a savepoint.
        """
        current = gevent.getcurrent()
        with self.lock:
            self._writers[current] = self._writers.get(current, 0) + 1
            try:
                with self.connection() as database:
                    with (database.atomic() if self.is_postgres
                          else database.atomic('IMMEDIATE')):
                        yield database
            finally:
                self._writers[current] -= 1
                if not self._writers[current]:
                    del self._writers[current]

    def in_write(self):
        """True inside a writing() block of this greenlet (its statements join it)."""
        return gevent.getcurrent() in self._writers

    def write(self, fn, *args, **kwargs):
        """Run `fn(*args, **kwargs)` in the group-committed transaction; its result once
        committed (storage/group_commit.py has the other ways to queue a write)."""
        return self.writer.write(fn, *args, **kwargs)

    def run_writer(self):
        """The writer greenlet's body: a connection of its own, then the commit loop."""
        with self.connection():
            self.writer.run()

    def execute(self, sql, params=()):
        """Hand-written SQL with `?` placeholders, on either backend (execute())."""
        return execute(self.database, sql, params)

    def ping(self):
        """True when the database answers a trivial query (a health check)."""
        try:
            with self.connection() as database:
                database.execute_sql('SELECT 1').fetchone()
            return True
        except Exception:
            return False


def execute(database, sql, params=()):
    """Run SQL written with `?` placeholders on `database` (a database or its proxy).

    The per-message paths use hand-written SQL: building a peewee query cost more than
    running it. psycopg2 takes `%s`, so `%` is escaped and `?` translated there.
    """
    if database.param != '?':
        sql = sql.replace('%', '%%').replace('?', database.param)
    return database.execute_sql(sql, params)
