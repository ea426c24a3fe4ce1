"""The inbox of meshd.db: what the daemon received, and how far it reached the agent
(spec/daemon.md §3.2, spec/agents.md §1)."""
import collections

from peewee import SQL, Case, IntegerField, TextField

from storage.base import BaseModel, delete_batch, execute, placeholders


# The columns an inbox item shows (meshd/api/mailbox.py), read as tuples on hot paths.
ITEM_COLUMNS = ('id', 'client_message_id', 'broker_message_id', 'mesh', 'topic',
                'sender_pubkey', 'sender_name', 'sender_member_pubkey', 'body', 'received_at',
                'reply_to_id', 'seen_at', 'recipient_pubkey', 'recipient_kind',
                'decrypt_failed', 'e2e', 'priority', 'emitted_at', 'surfaced_at',
                'surfaced_via')
ItemRow = collections.namedtuple('ItemRow', ITEM_COLUMNS)
_ITEM_SELECT = ', '.join('"%s"' % column for column in ITEM_COLUMNS)


class Inbox(BaseModel):
    """A received message, one row per (mesh, sender, client_message_id, recipient).

    The sender is part of the key: with the id alone, one member could suppress another's
    DM by reusing its id (DESIGN.md 6). `e2e` is 1 only when the body opened with
    crypto_box from the stated sender; any other row is shown as a broadcast.
    """
    id = TextField(primary_key=True)
    client_message_id = TextField()
    broker_message_id = TextField(null=True)
    mesh = TextField()
    topic = TextField(null=True)
    sender_pubkey = TextField()
    sender_name = TextField()
    body = TextField(null=True)
    meta = TextField(null=True)
    received_at = IntegerField()
    reply_to_id = TextField(null=True)
    seen_at = IntegerField(null=True)
    recipient_pubkey = TextField()
    recipient_kind = TextField(null=True)
    decrypt_failed = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    e2e = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    # The last hop (spec/agents.md §1): the push's priority, when an MCP bridge wrote a
    # channel notification for the row, when and how its text provably reached the agent,
    # and when the not_surfaced warning covered it.
    priority = TextField(null=True)
    emitted_at = IntegerField(null=True)
    surfaced_at = IntegerField(null=True)
    surfaced_via = TextField(null=True)
    surface_warned_at = IntegerField(null=True)
    # The sender's member, as the push or the address book named it at receipt.
    sender_member_pubkey = TextField(null=True)

    class Meta:
        table_name = 'inbox'

    @classmethod
    def in_scope(cls, scope):
        """The condition restricting rows to a session's scope (spec/daemon.md §8.5).

        `scope` is None (unscoped: every row) or a pair (session pubkey, member pubkey).
        This is the one chokepoint for session scoping of inbox queries. A row without a
        recipient ('', a legacy NULL before migration 3) is visible to every session.
        """
        if scope is None:
            return SQL('1 = 1')
        session_pubkey, member_pubkey = scope
        return ((cls.recipient_pubkey == '')
                | (cls.recipient_pubkey == session_pubkey)
                | (cls.recipient_pubkey == member_pubkey))

    @classmethod
    def insert_if_new(cls, row):
        """INSERT OR IGNORE on inbox_dedupe: True for a new row, False for a duplicate."""
        return execute('INSERT OR IGNORE INTO "inbox" (%s) VALUES (%s)'
                        % (', '.join('"%s"' % name for name in row), placeholders(row)),
                        list(row.values())).rowcount == 1

    @classmethod
    def listing(cls, scope, since=None, topic=None, sender=None, mesh=None, unread_only=False,
                limit=100):
        """The rows in `scope`, newest first, with the filters of inbox.list, as ItemRows.

        Hand-written: inbox.list is a hot read, and building peewee model objects cost
        about half of its time."""
        where, params = [], []
        if scope is not None:
            where.append('("recipient_pubkey" = \'\' OR "recipient_pubkey" = ? '
                         'OR "recipient_pubkey" = ?)')
            params.extend(scope)
        for column, value in (('received_at', since), ('topic', topic),
                              ('sender_pubkey', sender), ('mesh', mesh)):
            if value is not None:
                where.append('"%s" %s ?' % (column, '>=' if column == 'received_at' else '='))
                params.append(value)
        if unread_only:
            where.append('"seen_at" IS NULL')
        cursor = execute('SELECT %s FROM "inbox"%s ORDER BY "received_at" DESC, "id" LIMIT ?'
                         % (_ITEM_SELECT, ' WHERE ' + ' AND '.join(where) if where else ''),
                         params + [limit])
        return [ItemRow._make(row) for row in cursor]

    @classmethod
    def ids_in_scope(cls, ids, scope):
        return [row.id for row in cls.select(cls.id).where(cls.id.in_(ids) & cls.in_scope(scope))]

    @classmethod
    def mark_seen(cls, ids, now):
        """Stamp unseen rows among `ids`; rows already seen keep their first timestamp."""
        if not ids:
            return 0
        return (cls.update(seen_at=now)
                .where(cls.id.in_(ids) & cls.seen_at.is_null())
                .execute())

    @classmethod
    def mark_emitted(cls, ids, now):
        """Stamp `emitted_at` on rows among `ids` that have none; return how many."""
        if not ids:
            return 0
        return (cls.update(emitted_at=now)
                .where(cls.id.in_(ids) & cls.emitted_at.is_null())
                .execute())

    @classmethod
    def mark_surfaced(cls, ids, now, via):
        """Stamp rows among `ids` surfaced `via` a path; the first surfacing stays."""
        if not ids:
            return 0
        return (cls.update(surfaced_at=now, surfaced_via=via)
                .where(cls.id.in_(ids) & cls.surfaced_at.is_null())
                .execute())

    @classmethod
    def unemitted(cls, scope, mesh, since, limit):
        """Rows of `mesh` in `scope` received since `since` that no bridge emitted and no
        path surfaced, in the order they arrived (what a bridge missed while the daemon was
        away); rows of one millisecond keep their insertion order (rowid)."""
        return list(cls.select().where(
            cls.in_scope(scope) & (cls.mesh == mesh) & (cls.received_at >= since)
            & cls.emitted_at.is_null() & cls.surfaced_at.is_null())
            .order_by(cls.received_at, SQL('rowid')).limit(limit))

    @classmethod
    def due_to_agent(cls, scope, mesh, now, grace, after=None, limit=100, urgent_first=False):
        """(rows, how many in all) not yet surfaced to the agent, oldest first (`now` rows
        before the others with `urgent_first`).

        A row a bridge emitted less than `grace` ms ago waits for its channel confirmation.
        A row is due from its arrival, or from the end of its grace when it was emitted;
        `after` keeps only rows that became due after that moment.
        """
        due_since = Case(None, [(cls.emitted_at.is_null(), cls.received_at)],
                         cls.emitted_at + grace)
        condition = (cls.in_scope(scope) & (cls.mesh == mesh) & cls.surfaced_at.is_null()
                     & (due_since <= now))
        if after is not None:
            condition &= due_since > after
        query = cls.select().where(condition)
        order = [cls.received_at, SQL('rowid')]
        if urgent_first:
            order.insert(0, Case(None, [(cls.priority == 'now', 0)], 1))
        return list(query.order_by(*order).limit(limit)), query.count()

    @classmethod
    def overdue(cls, cutoff, limit):
        """Rows received before `cutoff`, never surfaced and never warned about, oldest first."""
        return list(cls.select().where(
            cls.surfaced_at.is_null() & cls.surface_warned_at.is_null()
            & (cls.received_at < cutoff)).order_by(cls.received_at).limit(limit))

    @classmethod
    def mark_warned(cls, ids, now):
        if not ids:
            return 0
        return cls.update(surface_warned_at=now).where(cls.id.in_(ids)).execute()

    @classmethod
    def flush(cls, scope, mesh=None, before=None):
        """Delete the rows in `scope`, optionally of one mesh and received before `before`."""
        condition = cls.in_scope(scope)
        if mesh is not None:
            condition &= cls.mesh == mesh
        if before is not None:
            condition &= cls.received_at < before
        return cls.delete().where(condition).execute()

    @classmethod
    def delete_one(cls, row_id, scope):
        return cls.delete().where((cls.id == row_id) & cls.in_scope(scope)).execute()

    @classmethod
    def prune(cls, cutoff, limit):
        """Delete up to `limit` rows received before `cutoff`; return how many."""
        return delete_batch('inbox', '"received_at" < ?', [cutoff], limit)


Inbox.add_index(Inbox.index(Inbox.received_at, name='inbox_received_at'))
Inbox.add_index(Inbox.index(Inbox.topic, name='inbox_topic'))
Inbox.add_index(Inbox.index(Inbox.sender_pubkey, name='inbox_sender'))
Inbox.add_index(Inbox.index(Inbox.seen_at, name='inbox_seen_at'))
Inbox.add_index(Inbox.index(Inbox.recipient_pubkey, name='inbox_recipient'))
Inbox.add_index(Inbox.index(Inbox.mesh, Inbox.sender_pubkey, Inbox.client_message_id,
                            Inbox.recipient_pubkey, unique=True, name='inbox_dedupe'))
Inbox.add_index(Inbox.index(Inbox.surfaced_at, Inbox.received_at, name='inbox_unsurfaced'))
