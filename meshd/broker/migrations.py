"""The broker's schema migrations, frozen SQL for SQLite and PostgreSQL (spec/wire.md §11.5).

Run by storage/migrate.py (user_version on SQLite, the `meshd_schema` table on PostgreSQL,
an advisory lock for concurrent starters). The two backends differ only in column types,
so each statement is written once with {ts}, {pid}, {serial} and {bool} in place of them.
A later change to meshd/broker/models.py must add a migration, never edit these.
"""
from storage.migrate import Migration, head

_TYPES = {'sqlite': {'ts': 'DATETIME', 'pid': 'INTEGER', 'serial': 'INTEGER', 'bool': 'INTEGER'},
          'postgresql': {'ts': 'TIMESTAMP', 'pid': 'BIGINT', 'serial': 'SERIAL',
                         'bool': 'BOOLEAN'}}

_V1 = (
    'CREATE TABLE IF NOT EXISTS "mesh" ("id" VARCHAR(40) NOT NULL PRIMARY KEY, '
    '"name" TEXT NOT NULL, "slug" VARCHAR(64) NOT NULL, "owner_user_id" TEXT, '
    '"owner_pubkey" VARCHAR(64) NOT NULL, "owner_secret_key" VARCHAR(128) NOT NULL, '
    '"root_key" TEXT NOT NULL, "self_editable" TEXT NOT NULL, "created_at" {ts} NOT NULL, '
    '"archived_at" {ts})',
    'CREATE UNIQUE INDEX IF NOT EXISTS "mesh_slug" ON "mesh" ("slug")',
    'CREATE TABLE IF NOT EXISTS "member" ("id" VARCHAR(40) NOT NULL PRIMARY KEY, '
    '"mesh_id" VARCHAR(40) NOT NULL, "user_id" TEXT, "peer_pubkey" VARCHAR(64) NOT NULL, '
    '"display_name" TEXT NOT NULL, "role" VARCHAR(16) NOT NULL, "role_tag" TEXT, '
    '"default_groups" TEXT NOT NULL, "message_mode" VARCHAR(16) NOT NULL, '
    '"dashboard_user_id" TEXT, "joined_at" {ts} NOT NULL, "last_seen_at" {ts}, '
    '"revoked_at" {ts}, "peer_grants" TEXT NOT NULL)',
    'CREATE INDEX IF NOT EXISTS "member_mesh_id_peer_pubkey" ON "member" ("mesh_id", "peer_pubkey")',
    'CREATE TABLE IF NOT EXISTS "invite" ("id" VARCHAR(40) NOT NULL PRIMARY KEY, '
    '"mesh_id" VARCHAR(40) NOT NULL, "token" TEXT NOT NULL, "token_bytes" TEXT NOT NULL, '
    '"code" VARCHAR(16), "max_uses" INTEGER NOT NULL, "used_count" INTEGER NOT NULL, '
    '"role" VARCHAR(16) NOT NULL, "preset" TEXT NOT NULL, "expires_at" {ts} NOT NULL, '
    '"created_by" TEXT NOT NULL, "created_at" {ts} NOT NULL, "revoked_at" {ts}, '
    '"version" INTEGER NOT NULL, "capability_v2" TEXT, "claimed_by_pubkey" TEXT)',
    'CREATE UNIQUE INDEX IF NOT EXISTS "invite_token" ON "invite" ("token")',
    'CREATE UNIQUE INDEX IF NOT EXISTS "invite_code" ON "invite" ("code")',
    'CREATE TABLE IF NOT EXISTS "presence" ("id" VARCHAR(40) NOT NULL PRIMARY KEY, '
    '"member_id" VARCHAR(40) NOT NULL, "mesh_id" VARCHAR(40) NOT NULL, '
    '"session_id" TEXT NOT NULL, "session_pubkey" VARCHAR(64), "display_name" TEXT, '
    '"pid" {pid} NOT NULL, "cwd" TEXT NOT NULL, "status" VARCHAR(16) NOT NULL, '
    '"status_source" VARCHAR(16) NOT NULL, "status_updated_at" {ts}, "summary" TEXT, '
    '"groups" TEXT NOT NULL, "role" VARCHAR(16) NOT NULL, "connected_at" {ts} NOT NULL, '
    '"last_ping_at" {ts} NOT NULL, "disconnected_at" {ts})',
    'CREATE INDEX IF NOT EXISTS "presence_session_pubkey" ON "presence" ("session_pubkey")',
    'CREATE INDEX IF NOT EXISTS "presence_disconnected_at" ON "presence" ("disconnected_at")',
    'CREATE INDEX IF NOT EXISTS "presence_mesh_id_disconnected_at" ON "presence" '
    '("mesh_id", "disconnected_at")',
    'CREATE TABLE IF NOT EXISTS "message_queue" ("id" VARCHAR(40) NOT NULL PRIMARY KEY, '
    '"mesh_id" VARCHAR(40) NOT NULL, "sender_member_id" VARCHAR(40) NOT NULL, '
    '"sender_session_pubkey" VARCHAR(64), "target_spec" TEXT NOT NULL, '
    '"priority" VARCHAR(8) NOT NULL, "nonce" TEXT NOT NULL, "ciphertext" TEXT NOT NULL, '
    '"created_at" {ts} NOT NULL, "delivered_at" {ts}, "expires_at" {ts} NOT NULL, '
    '"client_message_id" TEXT, "request_fingerprint" TEXT, "claimed_at" {ts}, '
    '"claim_id" VARCHAR(40), "claim_expires_at" {ts})',
    'CREATE INDEX IF NOT EXISTS "message_queue_mesh_id_delivered_at_target_spec" ON '
    '"message_queue" ("mesh_id", "delivered_at", "target_spec")',
    'CREATE INDEX IF NOT EXISTS "message_queue_client_message_id" ON "message_queue" '
    '("client_message_id")',
    'CREATE INDEX IF NOT EXISTS "message_queue_claim_id" ON "message_queue" ("claim_id")',
    'CREATE INDEX IF NOT EXISTS "message_queue_expires_at" ON "message_queue" ("expires_at")',
    'CREATE INDEX IF NOT EXISTS "message_queue_delivered_at" ON "message_queue" ("delivered_at")',
    'CREATE TABLE IF NOT EXISTS "peer_state" ("id" {serial} NOT NULL PRIMARY KEY, '
    '"mesh_id" VARCHAR(40) NOT NULL, "member_id" VARCHAR(40) NOT NULL, '
    '"groups" TEXT NOT NULL, "profile" TEXT NOT NULL, "visible" {bool} NOT NULL, '
    '"last_summary" TEXT, "last_display_name" TEXT, "cumulative_stats" TEXT NOT NULL, '
    '"last_seen_at" {ts} NOT NULL)',
    'CREATE UNIQUE INDEX IF NOT EXISTS "peer_state_mesh_id_member_id" ON "peer_state" '
    '("mesh_id", "member_id")',
)

_V2 = (
    'CREATE TABLE IF NOT EXISTS "state" ("id" {serial} NOT NULL PRIMARY KEY, '
    '"mesh_id" VARCHAR(40) NOT NULL, "key" TEXT NOT NULL, "value" TEXT, '
    '"updated_by_presence" VARCHAR(40), "updated_by_name" TEXT, "updated_at" {ts} NOT NULL)',
    'CREATE UNIQUE INDEX IF NOT EXISTS "state_mesh_id_key" ON "state" ("mesh_id", "key")',
    'CREATE TABLE IF NOT EXISTS "memory" ("id" VARCHAR(40) NOT NULL PRIMARY KEY, '
    '"mesh_id" VARCHAR(40) NOT NULL, "content" TEXT NOT NULL, "tags" TEXT NOT NULL, '
    '"remembered_by" VARCHAR(40), "remembered_by_name" TEXT, "remembered_at" {ts} NOT NULL, '
    '"forgotten_at" {ts})',
    'CREATE INDEX IF NOT EXISTS "memory_mesh_id_remembered_at" ON "memory" '
    '("mesh_id", "remembered_at")',
    'CREATE TABLE IF NOT EXISTS "skill" ("id" VARCHAR(40) NOT NULL PRIMARY KEY, '
    '"mesh_id" VARCHAR(40) NOT NULL, "name" TEXT NOT NULL, "description" TEXT NOT NULL, '
    '"instructions" TEXT NOT NULL, "tags" TEXT NOT NULL, "manifest" TEXT, '
    '"author_member_id" VARCHAR(40), "author_name" TEXT, "created_at" {ts} NOT NULL, '
    '"updated_at" {ts} NOT NULL)',
    'CREATE UNIQUE INDEX IF NOT EXISTS "skill_mesh_id_name" ON "skill" ("mesh_id", "name")',
    'CREATE TABLE IF NOT EXISTS "pending_status" ("id" {serial} NOT NULL PRIMARY KEY, '
    '"pid" {pid}, "cwd" TEXT NOT NULL, "status" VARCHAR(16) NOT NULL, '
    '"status_source" VARCHAR(16) NOT NULL, "created_at" {ts} NOT NULL, "applied_at" {ts})',
    'CREATE INDEX IF NOT EXISTS "pending_status_pid_cwd" ON "pending_status" ("pid", "cwd")',
)

_V3 = (
    'ALTER TABLE "message_queue" ADD COLUMN "undelivered_at" {ts}',
    'ALTER TABLE "message_queue" ADD COLUMN "undelivered_reason" TEXT',
    'ALTER TABLE "message_queue" ADD COLUMN "sender_notified_at" {ts}',
    'CREATE INDEX IF NOT EXISTS "message_queue_sender_member_id_undelivered_at" ON '
    '"message_queue" ("sender_member_id", "undelivered_at")',
)

# The duplicate check of every send reads (sender, client id): with only the index on
# (sender_member_id, undelivered_at) SQLite's planner scanned every row the sender ever
# queued, and delivered rows stay until their TTL, so each send got slower (11 ms at 19k rows).
_V4 = (
    'CREATE INDEX IF NOT EXISTS "message_queue_sender_member_id_client_message_id" ON '
    '"message_queue" ("sender_member_id", "client_message_id")',
)


def _migration(number, statements, doc):
    return Migration(number, [s.format(**_TYPES['sqlite']) for s in statements],
                     [s.format(**_TYPES['postgresql']) for s in statements], doc=doc)


MIGRATIONS = [
    _migration(1, _V1, 'identity, presence and queue tables'),
    # The tables behind the daemon's state, memory and skills verbs (§4.4) and the hook
    # statuses that arrive before their presence (§9.4).
    _migration(2, _V2, 'state, memory, skills, pending hook statuses'),
    # DMs the broker gives up on are kept, with a reason, until their sender's daemon was
    # told (meshd extension `undelivered`, docs/wire-extensions.md).
    _migration(3, _V3, 'undelivered DMs and their notices'),
    _migration(4, _V4, 'a send\'s duplicate check by (sender, client id)'),
]
HEAD = head(MIGRATIONS)
