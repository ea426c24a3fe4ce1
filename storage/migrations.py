"""Schema migrations of meshd.db, numbered by `PRAGMA user_version` (DESIGN.md 5).

Each migration is frozen SQL, deliberately independent of the models in storage.models: a
later change to a model must not change what migration 1 created on an old database. A
test checks that migrating from 0 gives the schema of `create_tables(MODELS)`.
"""
import logging
import os
import sqlite3

from storage.db import StorageError, create_private_file, writing

log = logging.getLogger(__name__)

AUTO_VACUUM_INCREMENTAL = 2

_INITIAL_SCHEMA = (
    'CREATE TABLE "outbox" ("id" TEXT NOT NULL PRIMARY KEY, '
    '"client_message_id" TEXT NOT NULL, "request_fingerprint" BLOB NOT NULL, '
    '"payload" BLOB NOT NULL, "enqueued_at" INTEGER NOT NULL, '
    '"attempts" INTEGER NOT NULL DEFAULT 0, "next_attempt_at" INTEGER NOT NULL, '
    '"status" TEXT NOT NULL CHECK (status IN '
    "('pending','inflight','done','dead','aborted')), "
    '"last_error" TEXT, "delivered_at" INTEGER, "broker_message_id" TEXT, '
    '"aborted_at" INTEGER, "aborted_by" TEXT, "superseded_by" TEXT, "mesh" TEXT NOT NULL, '
    '"target_spec" TEXT NOT NULL, "nonce" TEXT NOT NULL, "ciphertext" TEXT NOT NULL, '
    '"priority" TEXT, "sender_session_pubkey" TEXT, "expires_at" INTEGER NOT NULL)',
    'CREATE UNIQUE INDEX "outbox_client_message_id" ON "outbox" ("client_message_id")',
    'CREATE INDEX "outbox_pending" ON "outbox" ("status", "next_attempt_at")',
    'CREATE INDEX "outbox_aborted" ON "outbox" ("status", "aborted_at") '
    "WHERE status = 'aborted'",

    'CREATE TABLE "inbox" ("id" TEXT NOT NULL PRIMARY KEY, '
    '"client_message_id" TEXT NOT NULL, "broker_message_id" TEXT, "mesh" TEXT NOT NULL, '
    '"topic" TEXT, "sender_pubkey" TEXT NOT NULL, "sender_name" TEXT NOT NULL, "body" TEXT, '
    '"meta" TEXT, "received_at" INTEGER NOT NULL, "reply_to_id" TEXT, "seen_at" INTEGER, '
    '"recipient_pubkey" TEXT, "recipient_kind" TEXT, '
    '"decrypt_failed" INTEGER NOT NULL DEFAULT 0)',
    'CREATE INDEX "inbox_received_at" ON "inbox" ("received_at")',
    'CREATE INDEX "inbox_topic" ON "inbox" ("topic")',
    'CREATE INDEX "inbox_sender" ON "inbox" ("sender_pubkey")',
    'CREATE INDEX "inbox_seen_at" ON "inbox" ("seen_at")',
    'CREATE INDEX "inbox_recipient" ON "inbox" ("recipient_pubkey")',
    'CREATE UNIQUE INDEX "inbox_dedupe" ON "inbox" ("client_message_id", "recipient_pubkey")',

    'CREATE TABLE "sessions" ("token" TEXT NOT NULL PRIMARY KEY, '
    '"session_id" TEXT NOT NULL, "mesh" TEXT NOT NULL, "display_name" TEXT NOT NULL, '
    '"pid" INTEGER NOT NULL, "cwd" TEXT, "role" TEXT, "groups" TEXT, "start_time" TEXT, '
    '"registered_at" INTEGER NOT NULL)',
    'CREATE INDEX "sessions_session_id" ON "sessions" ("session_id")',

    'CREATE TABLE "idempotency" ("client_message_id" TEXT NOT NULL PRIMARY KEY, '
    '"request_fingerprint" BLOB NOT NULL, "outbox_id" TEXT NOT NULL, '
    '"created_at" INTEGER NOT NULL)',

    'CREATE TABLE "events" ("seq" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, '
    '"epoch" TEXT NOT NULL, "kind" TEXT NOT NULL, "ts" TEXT NOT NULL, "mesh" TEXT, '
    '"recipient_kind" TEXT, "recipient_pubkey" TEXT, "data" TEXT NOT NULL)',
    'CREATE INDEX "events_recipient" ON "events" ("recipient_pubkey")',
)


def _create_initial(database):
    for statement in _INITIAL_SCHEMA:
        database.execute_sql(statement)


def _add_link_queue_index(database):
    # The drain reads each link's pending rows in acceptance order: with only
    # (status, next_attempt_at) every pass sorted all pending rows of every link.
    database.execute_sql('CREATE INDEX "outbox_link_queue" ON "outbox" '
                         '("status", "mesh", "sender_session_pubkey")')


_OUTBOX_V3 = (
    'CREATE TABLE "outbox_v3" ("id" TEXT NOT NULL PRIMARY KEY, '
    '"client_message_id" TEXT NOT NULL, "request_fingerprint" BLOB NOT NULL, '
    '"payload" BLOB NOT NULL, "enqueued_at" INTEGER NOT NULL, '
    '"attempts" INTEGER NOT NULL DEFAULT 0, "next_attempt_at" INTEGER NOT NULL, '
    '"status" TEXT NOT NULL CHECK (status IN '
    "('pending','inflight','done','dead','aborted','undelivered')), "
    '"last_error" TEXT, "delivered_at" INTEGER, "broker_message_id" TEXT, '
    '"aborted_at" INTEGER, "aborted_by" TEXT, "superseded_by" TEXT, "mesh" TEXT NOT NULL, '
    '"target_spec" TEXT NOT NULL, "nonce" TEXT NOT NULL, "ciphertext" TEXT NOT NULL, '
    '"priority" TEXT, "sender_session_pubkey" TEXT, "expires_at" INTEGER NOT NULL)',
    'INSERT INTO "outbox_v3" SELECT * FROM "outbox"',
    'DROP TABLE "outbox"',
    'ALTER TABLE "outbox_v3" RENAME TO "outbox"',
    'CREATE UNIQUE INDEX "outbox_client_message_id" ON "outbox" ("client_message_id")',
    'CREATE INDEX "outbox_pending" ON "outbox" ("status", "next_attempt_at")',
    'CREATE INDEX "outbox_aborted" ON "outbox" ("status", "aborted_at") '
    "WHERE status = 'aborted'",
    'CREATE INDEX "outbox_link_queue" ON "outbox" ("status", "mesh", "sender_session_pubkey")',
)

_INBOX_V3 = (
    'CREATE TABLE "inbox_v3" ("id" TEXT NOT NULL PRIMARY KEY, '
    '"client_message_id" TEXT NOT NULL, "broker_message_id" TEXT, "mesh" TEXT NOT NULL, '
    '"topic" TEXT, "sender_pubkey" TEXT NOT NULL, "sender_name" TEXT NOT NULL, "body" TEXT, '
    '"meta" TEXT, "received_at" INTEGER NOT NULL, "reply_to_id" TEXT, "seen_at" INTEGER, '
    '"recipient_pubkey" TEXT NOT NULL, "recipient_kind" TEXT, '
    '"decrypt_failed" INTEGER NOT NULL DEFAULT 0, "e2e" INTEGER NOT NULL DEFAULT 0)',
    # A NULL recipient (never written by meshd, kept by the rule of spec/daemon.md §8.5)
    # becomes '', which in_scope() reads the same way. Rows that would now collide are
    # exact copies (same mesh, sender, id and recipient), so OR IGNORE loses no message.
    # Whether an old row was sealed end to end was not recorded: e2e stays 0, so an old
    # row is never shown as a private message (a forged one could not be told apart).
    'INSERT OR IGNORE INTO "inbox_v3" ("id", "client_message_id", "broker_message_id", "mesh", '
    '"topic", "sender_pubkey", "sender_name", "body", "meta", "received_at", "reply_to_id", '
    '"seen_at", "recipient_pubkey", "recipient_kind", "decrypt_failed") '
    'SELECT "id", "client_message_id", "broker_message_id", "mesh", "topic", "sender_pubkey", '
    '"sender_name", "body", "meta", "received_at", "reply_to_id", "seen_at", '
    'COALESCE("recipient_pubkey", \'\'), "recipient_kind", "decrypt_failed" FROM "inbox" '
    'ORDER BY rowid',
    'DROP TABLE "inbox"',
    'ALTER TABLE "inbox_v3" RENAME TO "inbox"',
    'CREATE INDEX "inbox_received_at" ON "inbox" ("received_at")',
    'CREATE INDEX "inbox_topic" ON "inbox" ("topic")',
    'CREATE INDEX "inbox_sender" ON "inbox" ("sender_pubkey")',
    'CREATE INDEX "inbox_seen_at" ON "inbox" ("seen_at")',
    'CREATE INDEX "inbox_recipient" ON "inbox" ("recipient_pubkey")',
    'CREATE UNIQUE INDEX "inbox_dedupe" ON "inbox" '
    '("mesh", "sender_pubkey", "client_message_id", "recipient_pubkey")',
)


def _dedupe_inbox_by_sender(database):
    # The inbox kept one row per (client_message_id, recipient): a member who knew or
    # guessed another member's id could suppress that member's DM (DESIGN.md 6). The
    # outbox gains the terminal status `undelivered` (the broker reported the DM lost).
    # SQLite cannot alter a CHECK or a NOT NULL, so both tables are rebuilt.
    for statement in _OUTBOX_V3 + _INBOX_V3:
        database.execute_sql(statement)


MIGRATIONS = [(1, _create_initial), (2, _add_link_queue_index), (3, _dedupe_inbox_by_sender)]
HEAD = MIGRATIONS[-1][0]


class SchemaTooNewError(StorageError):
    """The database was written by a newer meshd than this one."""

    def __init__(self, found, head):
        self.found = found
        self.head = head
        super().__init__('database schema version %d is newer than this meshd supports (%d); '
                         'upgrade meshd or move the database aside' % (found, head))


def schema_version(database):
    """The database's `PRAGMA user_version`."""
    return database.execute_sql('PRAGMA user_version').fetchone()[0]


def backup_path(path, version):
    """Where the copy taken before migrating from `version` goes."""
    return '%s.pre-migration-v%d' % (path, version)


def _copy_aside(database, path, version):
    """Copy the database with SQLite's online backup, which includes committed WAL pages."""
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


def enable_incremental_vacuum(database):
    """Let pruning give pages back to the file system (`PRAGMA incremental_vacuum`).

    In WAL mode the setting takes effect only through a VACUUM, even on an empty file; it
    rewrites the file once (outside any transaction, at start-up, after the copy aside).
    """
    if database.execute_sql('PRAGMA auto_vacuum').fetchone()[0] == AUTO_VACUUM_INCREMENTAL:
        return
    database.execute_sql('PRAGMA auto_vacuum = INCREMENTAL')
    database.execute_sql('VACUUM')
    log.info('database set to incremental vacuum')


def migrate(database, path):
    """Bring the database at `path` to HEAD; return (from_version, to_version).

    The file is copied aside before the first migration runs on a database that already
    has a schema. A schema newer than HEAD raises SchemaTooNewError and changes nothing.
    """
    found = schema_version(database)
    if found > HEAD:
        raise SchemaTooNewError(found, HEAD)
    if found == HEAD:
        return found, found
    has_tables = database.execute_sql(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    if found > 0 or has_tables:
        copy = _copy_aside(database, path, found)
        log.info('database copied aside before migration: %s', copy)
    enable_incremental_vacuum(database)
    for number, step in MIGRATIONS:
        if number <= found:
            continue
        with writing(database):
            step(database)
            database.execute_sql('PRAGMA user_version = %d' % number)
    return found, HEAD
