"""The daemon's schema migrations (meshd.db), numbered by `PRAGMA user_version` (DESIGN.md 5).

Frozen SQL, run by storage/migrate.py: a later change to a model in storage/models.py must
not change what an old migration created. A test checks that migrating from 0 gives the
schema of the models.
"""
from storage.migrate import Migration, head

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


MIGRATIONS = [
    Migration(1, _INITIAL_SCHEMA, doc='outbox, inbox, sessions, idempotency, events'),
    # The drain reads each link's pending rows in acceptance order: with only
    # (status, next_attempt_at) every pass sorted all pending rows of every link.
    Migration(2, ['CREATE INDEX "outbox_link_queue" ON "outbox" '
                  '("status", "mesh", "sender_session_pubkey")'],
              doc='one link\'s pending rows in rowid order'),
    # The inbox kept one row per (client_message_id, recipient): a member who knew or
    # guessed another member's id could suppress that member's DM (DESIGN.md 6). The
    # outbox gains the terminal status `undelivered` (the broker reported the DM lost).
    # SQLite cannot alter a CHECK or a NOT NULL, so both tables are rebuilt.
    Migration(3, _OUTBOX_V3 + _INBOX_V3, doc='inbox deduplicated per sender; undelivered'),
    # The last hop (spec/agents.md §1): a row records when a bridge emitted it and when and
    # how it reached the agent; hooks look for rows not surfaced, the oldest first.
    Migration(4, ['ALTER TABLE "inbox" ADD COLUMN "priority" TEXT',
                  'ALTER TABLE "inbox" ADD COLUMN "emitted_at" INTEGER',
                  'ALTER TABLE "inbox" ADD COLUMN "surfaced_at" INTEGER',
                  'ALTER TABLE "inbox" ADD COLUMN "surfaced_via" TEXT',
                  'ALTER TABLE "inbox" ADD COLUMN "surface_warned_at" INTEGER',
                  'CREATE INDEX "inbox_unsurfaced" ON "inbox" ("surfaced_at", "received_at")'],
              doc='inbox: priority, emitted, surfaced'),
    # Names that work (DESIGN.md 17): every member and session seen on each mesh, and the
    # member behind each inbox row's sender.
    Migration(5, ['CREATE TABLE "address_book" ("mesh" TEXT NOT NULL, "pubkey" TEXT NOT NULL, '
                  '"member_pubkey" TEXT NOT NULL, "kind" TEXT NOT NULL, "display_name" TEXT, '
                  '"first_seen_at" INTEGER NOT NULL, "last_seen_at" INTEGER NOT NULL, '
                  'PRIMARY KEY ("mesh", "pubkey"))',
                  'CREATE INDEX "address_book_member" ON "address_book" ("member_pubkey")',
                  'ALTER TABLE "inbox" ADD COLUMN "sender_member_pubkey" TEXT'],
              doc='address book; inbox sender member'),
    # Presence settings a caller set (status, summary, profile, groups): the broker forgets
    # them with the presence, so the daemon re-sends them whenever a link opens.
    Migration(6, ['CREATE TABLE "presence_settings" ("mesh" TEXT NOT NULL, '
                  '"owner" TEXT NOT NULL, "settings" TEXT NOT NULL, '
                  '"updated_at" INTEGER NOT NULL, PRIMARY KEY ("mesh", "owner"))'],
              doc='presence settings kept across restarts'),
]
HEAD = head(MIGRATIONS)
