"""Schema migrations: numbered, frozen SQL, for the daemon's and the broker's databases.

Each Migration is frozen SQL, deliberately independent of the models: a later change to a
model must not change what an old migration creates (a test checks that migrating from 0
gives the schema the models declare). The number lives in `PRAGMA user_version` on SQLite
and in a one-row table `meshd_schema` on PostgreSQL, where concurrent starters serialise on
an advisory lock. An SQLite file that already has a schema is copied aside (SQLite's online
backup, committed WAL pages included) before the first migration runs; a schema newer than
the code raises SchemaTooNewError and changes nothing (DESIGN.md 9).
"""
import logging
import os
import sqlite3

from storage.errors import SchemaTooNewError
from storage.store import create_private_file

log = logging.getLogger(__name__)

SCHEMA_TABLE = 'meshd_schema'
PG_ADVISORY_KEY = 0x6d657368  # "mesh"
AUTO_VACUUM_INCREMENTAL = 2


class Migration:
    """Schema version `number`: statements for SQLite, and for PostgreSQL when they differ."""

    def __init__(self, number, sqlite, postgresql=None, doc=''):
        self.number = number
        self.sqlite = tuple(sqlite)
        self.postgresql = tuple(sqlite if postgresql is None else postgresql)
        self.doc = doc

    def statements(self, store):
        return self.postgresql if store.is_postgres else self.sqlite


def head(migrations):
    return migrations[-1].number


def schema_version(store):
    """The schema number stored in the database (0 for an empty one)."""
    with store.connection() as database:
        if store.is_postgres:
            if SCHEMA_TABLE not in database.get_tables():
                return 0
            row = database.execute_sql('SELECT version FROM %s' % SCHEMA_TABLE).fetchone()
            return row[0] if row else 0
        return database.execute_sql('PRAGMA user_version').fetchone()[0]


def backup_path(path, version):
    """Where the copy taken before migrating from `version` goes."""
    return '%s.pre-migration-v%d' % (path, version)


def migrate(store, migrations, what='database', incremental_vacuum=False):
    """Bring the store's schema to the last of `migrations`; return (from, to).

    `incremental_vacuum` sets an SQLite file to give freed pages back (the pruner's
    `PRAGMA incremental_vacuum`), once, with a VACUUM after the copy aside.
    """
    last = head(migrations)
    with store.connection() as database:
        if store.is_postgres:
            database.execute_sql('SELECT pg_advisory_lock(%s)', (PG_ADVISORY_KEY,))
        try:
            found = schema_version(store)
            if found > last:
                raise SchemaTooNewError(found, last, what)
            if found == last:
                return found, found
            if not store.is_postgres:
                if found > 0 or database.get_tables():
                    copy = _copy_aside(database, store.path, found)
                    log.info('database copied aside before migration: %s', copy)
                if incremental_vacuum:
                    _enable_incremental_vacuum(database)
            for migration in migrations:
                if migration.number <= found:
                    continue
                with store.writing():
                    for statement in migration.statements(store):
                        database.execute_sql(statement)
                    _set_version(store, database, migration.number)
                log.info('%s migrated to schema %d', what, migration.number)
            return found, last
        finally:
            if store.is_postgres:
                database.execute_sql('SELECT pg_advisory_unlock(%s)', (PG_ADVISORY_KEY,))


def _set_version(store, database, number):
    if store.is_postgres:
        database.execute_sql('CREATE TABLE IF NOT EXISTS %s (version integer NOT NULL)'
                             % SCHEMA_TABLE)
        database.execute_sql('DELETE FROM %s' % SCHEMA_TABLE)
        database.execute_sql('INSERT INTO %s (version) VALUES (%%s)' % SCHEMA_TABLE, (number,))
    else:
        database.execute_sql('PRAGMA user_version = %d' % int(number))


def _copy_aside(database, path, version):
    target = backup_path(path, version)
    if os.path.exists(target):
        os.unlink(target)
    create_private_file(target)
    dest = sqlite3.connect(target)
    try:
        database.connection().backup(dest)
    finally:
        dest.close()
    return target


def _enable_incremental_vacuum(database):
    # In WAL mode the setting takes effect only through a VACUUM, even on an empty file; it
    # rewrites the file once (outside any transaction, at start-up, after the copy aside).
    if database.execute_sql('PRAGMA auto_vacuum').fetchone()[0] == AUTO_VACUUM_INCREMENTAL:
        return
    database.execute_sql('PRAGMA auto_vacuum = INCREMENTAL')
    database.execute_sql('VACUUM')
    log.info('database set to incremental vacuum')
