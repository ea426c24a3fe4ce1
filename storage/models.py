"""peewee models of meshd.db: outbox, sessions, idempotency, events (spec/daemon.md §3); the
inbox is storage/inbox.py, the address book storage/address_book.py, the presence settings
storage/presence_settings.py. storage/base.py says how models are used.
"""
from peewee import SQL, BlobField, IntegerField, TextField
from playhouse.sqlite_ext import AutoIncrementField

from storage.address_book import AddressBook
from storage.base import BaseModel, database, delete_batch, execute, placeholders
from storage.inbox import Inbox
from storage.presence_settings import PresenceSetting

__all__ = ['AddressBook', 'Event', 'Idempotency', 'Inbox', 'MODELS', 'Outbox',
           'PresenceSetting', 'Session', 'database', 'return_free_pages']

OUTBOX_STATUSES = ('pending', 'inflight', 'done', 'dead', 'aborted', 'undelivered')
FINISHED_STATUSES = ('done', 'dead', 'aborted', 'undelivered')
RETENTION_MS = 30 * 24 * 3600 * 1000
EVENT_LOG_KEEP = 10000


# The columns `send` writes, in one prepared-once statement per table.
_ACCEPT_COLUMNS = ('id', 'client_message_id', 'request_fingerprint', 'payload', 'enqueued_at',
                   'attempts', 'next_attempt_at', 'status', 'mesh', 'target_spec', 'nonce',
                   'ciphertext', 'priority', 'expires_at', 'sender_session_pubkey')
_ACCEPT_OUTBOX = 'INSERT INTO "outbox" (%s) VALUES (%s)' % (
    ', '.join('"%s"' % column for column in _ACCEPT_COLUMNS), ', '.join('?' * len(_ACCEPT_COLUMNS)))
_ACCEPT_KEY = ('INSERT INTO "idempotency" ("client_message_id", "request_fingerprint", '
               '"outbox_id", "created_at") VALUES (?, ?, ?, ?)')


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
    def accept(cls, row, fingerprint, now):
        """Insert an accepted row and its idempotency key (one transaction: the caller's).

        Hand-written: building peewee's INSERTs was a fifth of the cost of a send. A key
        already taken raises peewee.IntegrityError (client_message_id is unique in both
        tables), and the caller decides what the earlier send means."""
        execute(_ACCEPT_OUTBOX, [row[column] for column in _ACCEPT_COLUMNS])
        execute(_ACCEPT_KEY, (row['client_message_id'], fingerprint, row['id'], now))

    @classmethod
    def newest(cls, status=None, limit=50):
        """Rows newest first, optionally of one status."""
        query = cls.select()
        if status is not None:
            query = query.where(cls.status == status)
        return list(query.order_by(cls.enqueued_at.desc(), cls.id.desc()).limit(limit))

    @classmethod
    def by_id(cls, row_id):
        return cls.get_or_none(cls.id == row_id)

    @classmethod
    def due_for_link(cls, mesh, session_pubkey, now, limit):
        """A link's due pending rows in acceptance (rowid) order, through outbox_link_queue:
        a link that is closed, full or backed up costs the others nothing, and no pass
        sorts the whole queue."""
        return list(cls.raw(
            'SELECT * FROM "outbox" INDEXED BY "outbox_link_queue" '
            'WHERE "status" = \'pending\' AND "mesh" = ? AND "sender_session_pubkey" IS ? '
            'AND "next_attempt_at" <= ? ORDER BY "outbox".rowid LIMIT ?',
            mesh, session_pubkey, now, limit))

    @classmethod
    def unroutable(cls, meshes, session_pubkeys, now, limit):
        """Due rows no open link will read: their mesh was left or their session is gone."""
        return list(cls.select()
                    .where((cls.status == 'pending') & (cls.next_attempt_at <= now)
                           & (cls.mesh.not_in(list(meshes))
                              | (cls.sender_session_pubkey.is_null(False)
                                 & cls.sender_session_pubkey.not_in(list(session_pubkeys)))))
                    .order_by(cls.enqueued_at, cls.id)
                    .limit(limit))

    @classmethod
    def claim(cls, ids, now, lease_ms):
        """Claim the still-pending rows among `ids` (one UPDATE … RETURNING); their ids."""
        cursor = execute(
            'UPDATE "outbox" SET "status" = \'inflight\', "attempts" = "attempts" + 1, '
            '"next_attempt_at" = ? WHERE "status" = \'pending\' AND "id" IN (%s) RETURNING "id"'
            % placeholders(ids), [now + lease_ms] + list(ids))
        return {row[0] for row in cursor.fetchall()}

    @classmethod
    def finish(cls, row_id, status, **fields):
        """The outcome of an inflight row (one per message sent)."""
        fields['status'] = status
        return execute('UPDATE "outbox" SET %s WHERE "id" = ? AND "status" = \'inflight\''
                        % ', '.join('"%s" = ?' % name for name in fields),
                        list(fields.values()) + [row_id]).rowcount

    @classmethod
    def expire_pending(cls, now):
        """Pending rows past their expiry become dead (`expired`); return how many."""
        return (cls.update(status='dead', last_error='expired')
                .where((cls.status == 'pending') & (cls.expires_at <= now))
                .execute())

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
    def requeue(cls, row_id, new_id, new_cmid, now, aborted_by):
        """Abort a pending, inflight, dead or undelivered row and queue a copy of it under
        `new_cmid` (spec/daemon.md §3.1.4); None, or why not: 'not_allowed' or 'in_use'."""
        row = cls.by_id(row_id)
        if row is None or row.status in ('aborted', 'done'):
            return 'not_allowed'
        if Idempotency.lookup(new_cmid) is not None:
            return 'in_use'
        (cls.update(status='aborted', aborted_at=now, aborted_by=aborted_by,
                    superseded_by=new_id)
         .where((cls.id == row_id)
                & cls.status.in_(('pending', 'inflight', 'dead', 'undelivered')))
         .execute())
        copy = {name: getattr(row, name) for name in (
            'request_fingerprint', 'payload', 'mesh', 'target_spec', 'nonce', 'ciphertext',
            'priority', 'sender_session_pubkey')}
        copy.update(id=new_id, client_message_id=new_cmid, enqueued_at=now, attempts=0,
                    next_attempt_at=now, status='pending',
                    expires_at=now + (row.expires_at - row.enqueued_at))
        cls.accept(copy, row.request_fingerprint, now)
        return None

    @classmethod
    def prune(cls, cutoff, limit):
        """Delete up to `limit` finished rows accepted before `cutoff`; return how many."""
        return delete_batch('outbox', '"status" IN (%s) AND "enqueued_at" < ?'
                             % ', '.join("'%s'" % s for s in FINISHED_STATUSES), [cutoff], limit)


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

    @classmethod
    def save_binding(cls, **fields):
        """Insert or replace the row of `fields['token']`."""
        cls.insert(**fields).on_conflict_replace().execute()

    @classmethod
    def remove(cls, tokens):
        return cls.delete().where(cls.token.in_(list(tokens))).execute()

    @classmethod
    def keep_only(cls, tokens):
        """After rehydration: drop the rows that were not revived."""
        return cls.delete().where(cls.token.not_in(list(tokens))).execute()

    @classmethod
    def every(cls):
        return list(cls.select())


class Idempotency(BaseModel):
    """The key ledger of `send` (spec/daemon.md §3.5)."""
    client_message_id = TextField(primary_key=True)
    request_fingerprint = BlobField()
    outbox_id = TextField()
    created_at = IntegerField()

    class Meta:
        table_name = 'idempotency'

    @classmethod
    def lookup(cls, client_message_id):
        """(stored fingerprint, its outbox row or None), or None for a key never used."""
        key = cls.get_or_none(cls.client_message_id == client_message_id)
        if key is None:
            return None
        return bytes(key.request_fingerprint), Outbox.by_id(key.outbox_id)

    @classmethod
    def prune(cls, cutoff, limit):
        """Delete up to `limit` keys older than `cutoff` whose row is no longer queued (a
        ttl over 30 days keeps its key taken); return how many."""
        return delete_batch('idempotency', '"created_at" < ? AND "outbox_id" NOT IN '
                             '(SELECT "id" FROM "outbox" WHERE "status" IN '
                             '(\'pending\', \'inflight\'))', [cutoff], limit)


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
    def append(cls, epoch, kind, ts, mesh, recipient_kind, recipient_pubkey, data):
        """Insert one event (in the caller's transaction); return its seq."""
        return execute('INSERT INTO "events" ("epoch", "kind", "ts", "mesh", "recipient_kind", '
                        '"recipient_pubkey", "data") VALUES (?, ?, ?, ?, ?, ?, ?)',
                        (epoch, kind, ts, mesh, recipient_kind, recipient_pubkey,
                         data)).lastrowid

    @classmethod
    def clear(cls):
        return cls.delete().execute()

    @classmethod
    def trim(cls, newest=None, keep=EVENT_LOG_KEEP):
        """Keep the newest `keep` rows; return how many were removed."""
        if newest is None:
            newest = cls.newest_seq()
        return cls.delete().where(cls.seq <= newest - keep).execute()

    @classmethod
    def after(cls, seq, epoch):
        """Events of `epoch` with a sequence number above `seq`, oldest first."""
        return list(cls.select().where((cls.seq > seq) & (cls.epoch == epoch)).order_by(cls.seq))

    @classmethod
    def newest_seq(cls):
        """The highest sequence number in the log, 0 when it is empty."""
        value = cls.select(cls.seq).order_by(cls.seq.desc()).limit(1).scalar()
        return value or 0

    @classmethod
    def oldest_seq(cls):
        """The lowest retained sequence number, None when it is empty."""
        return cls.select(cls.seq).order_by(cls.seq.asc()).limit(1).scalar()


def return_free_pages(pages):
    """Give up to `pages` free pages back to the file system (incremental vacuum); return
    how many it gave. The pragma frees one page per step of its statement, and Python's
    sqlite3 steps a statement without result columns only once: one page per execution."""
    before = execute('PRAGMA freelist_count').fetchone()[0]
    for _ in range(min(before, pages)):
        execute('PRAGMA incremental_vacuum(1)')
    return before - execute('PRAGMA freelist_count').fetchone()[0]


# Indexes carry the names of spec/daemon.md §3 so that the migrations and the models agree.
Outbox.add_index(Outbox.index(Outbox.status, Outbox.next_attempt_at, name='outbox_pending'))
Outbox.add_index(Outbox.index(Outbox.status, Outbox.aborted_at, name='outbox_aborted',
                              where=SQL("status = 'aborted'")))
# Migration 2: one link's pending rows in acceptance (rowid) order, read without a sort.
Outbox.add_index(Outbox.index(Outbox.status, Outbox.mesh, Outbox.sender_session_pubkey,
                              name='outbox_link_queue'))
Session.add_index(Session.index(Session.session_id, name='sessions_session_id'))
Event.add_index(Event.index(Event.recipient_pubkey, name='events_recipient'))

MODELS = [Outbox, Inbox, Session, Idempotency, Event, AddressBook, PresenceSetting]
