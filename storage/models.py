"""peewee models of meshd.db: outbox, inbox, sessions, idempotency, events (spec/daemon.md §3).

Query helpers are classmethods named for what they mean and return a base query that the
caller may extend. Models hold no network or crypto code. Times are Unix epoch milliseconds.
"""
from peewee import SQL, BlobField, IntegerField, Model, TextField
from playhouse.sqlite_ext import AutoIncrementField

from storage.db import db

OUTBOX_STATUSES = ('pending', 'inflight', 'done', 'dead', 'aborted', 'undelivered')
FINISHED_STATUSES = ('done', 'dead', 'aborted', 'undelivered')
RETENTION_MS = 30 * 24 * 3600 * 1000
EVENT_LOG_KEEP = 10000


class BaseModel(Model):
    class Meta:
        database = db
        legacy_table_names = False


class Outbox(BaseModel):
    """A message accepted by `send`, durable before `send` answers (spec/daemon.md §3.1)."""
    id = TextField(primary_key=True)
    client_message_id = TextField(unique=True)
    request_fingerprint = BlobField()
    payload = BlobField()
    enqueued_at = IntegerField()
    attempts = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    next_attempt_at = IntegerField()
    status = TextField(constraints=[SQL("CHECK (status IN "
                                        "('pending','inflight','done','dead','aborted',"
                                        "'undelivered'))")])
    last_error = TextField(null=True)
    delivered_at = IntegerField(null=True)
    broker_message_id = TextField(null=True)
    aborted_at = IntegerField(null=True)
    aborted_by = TextField(null=True)
    superseded_by = TextField(null=True)
    mesh = TextField()
    target_spec = TextField()
    nonce = TextField()
    ciphertext = TextField()
    priority = TextField(null=True)
    sender_session_pubkey = TextField(null=True)
    expires_at = IntegerField()

    class Meta:
        table_name = 'outbox'

    @classmethod
    def newest(cls, status=None, limit=50):
        """Rows newest first, optionally of one status."""
        query = cls.select()
        if status is not None:
            query = query.where(cls.status == status)
        return query.order_by(cls.enqueued_at.desc(), cls.id.desc()).limit(limit)

    @classmethod
    def recover_inflight(cls, now):
        """Put rows a crash left `inflight` back to `pending` (spec/daemon.md §3.1.3)."""
        return (cls.update(status='pending', next_attempt_at=now)
                .where(cls.status == 'inflight')
                .execute())

    @classmethod
    def mark_undelivered(cls, client_message_id, broker_message_id, reason):
        """The broker gave up on a sent DM: its row becomes `undelivered` (terminal).

        A row the broker had acked (`done`) or that is still in flight; the broker's id,
        when the row has one, must be the notice's. Returns the number of rows changed.
        """
        condition = ((cls.client_message_id == client_message_id)
                     & cls.status.in_(('done', 'inflight', 'pending')))
        if broker_message_id:
            condition &= (cls.broker_message_id.is_null()
                          | (cls.broker_message_id == broker_message_id))
        return cls.update(status='undelivered', last_error=reason).where(condition).execute()

    @classmethod
    def prunable(cls, cutoff):
        """Finished rows accepted before `cutoff`."""
        return cls.status.in_(FINISHED_STATUSES) & (cls.enqueued_at < cutoff)


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


class Session(BaseModel):
    """A persisted session binding, without any secret key (spec/daemon.md §3.4)."""
    token = TextField(primary_key=True)
    session_id = TextField()
    mesh = TextField()
    display_name = TextField()
    pid = IntegerField()
    cwd = TextField(null=True)
    role = TextField(null=True)
    groups = TextField(null=True)
    start_time = TextField(null=True)
    registered_at = IntegerField()

    class Meta:
        table_name = 'sessions'


class Idempotency(BaseModel):
    """The key ledger of `send` (spec/daemon.md §3.5)."""
    client_message_id = TextField(primary_key=True)
    request_fingerprint = BlobField()
    outbox_id = TextField()
    created_at = IntegerField()

    class Meta:
        table_name = 'idempotency'


class Event(BaseModel):
    """The durable event log behind `events.subscribe` (spec/daemon.md §3.6)."""
    seq = AutoIncrementField()  # AUTOINCREMENT: a cursor is never reused, even after the start-up purge
    epoch = TextField()
    kind = TextField()
    ts = TextField()
    mesh = TextField(null=True)
    recipient_kind = TextField(null=True)
    recipient_pubkey = TextField(null=True)
    data = TextField()

    class Meta:
        table_name = 'events'

    @classmethod
    def after(cls, seq):
        """Events with a sequence number above `seq`, oldest first."""
        return cls.select().where(cls.seq > seq).order_by(cls.seq)

    @classmethod
    def newest_seq(cls):
        """The highest sequence number in the log, 0 when it is empty."""
        value = cls.select(cls.seq).order_by(cls.seq.desc()).limit(1).scalar()
        return value or 0

    @classmethod
    def oldest_seq(cls):
        """The lowest retained sequence number, None when the log is empty."""
        return cls.select(cls.seq).order_by(cls.seq.asc()).limit(1).scalar()


# Indexes carry the names of spec/daemon.md §3 so that migration 1 and the models agree.
Outbox.add_index(Outbox.index(Outbox.status, Outbox.next_attempt_at, name='outbox_pending'))
Outbox.add_index(Outbox.index(Outbox.status, Outbox.aborted_at, name='outbox_aborted',
                              where=SQL("status = 'aborted'")))
# Migration 2: one link's pending rows in acceptance (rowid) order, read without a sort.
Outbox.add_index(Outbox.index(Outbox.status, Outbox.mesh, Outbox.sender_session_pubkey,
                              name='outbox_link_queue'))
Inbox.add_index(Inbox.index(Inbox.received_at, name='inbox_received_at'))
Inbox.add_index(Inbox.index(Inbox.topic, name='inbox_topic'))
Inbox.add_index(Inbox.index(Inbox.sender_pubkey, name='inbox_sender'))
Inbox.add_index(Inbox.index(Inbox.seen_at, name='inbox_seen_at'))
Inbox.add_index(Inbox.index(Inbox.recipient_pubkey, name='inbox_recipient'))
Inbox.add_index(Inbox.index(Inbox.mesh, Inbox.sender_pubkey, Inbox.client_message_id,
                            Inbox.recipient_pubkey, unique=True, name='inbox_dedupe'))
Session.add_index(Session.index(Session.session_id, name='sessions_session_id'))
Event.add_index(Event.index(Event.recipient_pubkey, name='events_recipient'))

MODELS = [Outbox, Inbox, Session, Idempotency, Event]
