"""The broker's message queue: a DM waits here until its recipient acks it (spec/wire.md §7).

Every statement of the delivery paths is a named classmethod here; the per-message ones
are hand-written SQL (building a peewee query cost more than running it).
"""
import datetime

import peewee

from meshd.broker.models import BaseModel, as_datetime, placeholders, run_sql


class MessageQueue(BaseModel):
    """A queued message: DMs wait here until a client_ack; multicast rows are delivered at once."""
    id = peewee.CharField(primary_key=True, max_length=40)
    mesh_id = peewee.CharField(max_length=40)
    sender_member_id = peewee.CharField(max_length=40)
    sender_session_pubkey = peewee.CharField(max_length=64, null=True)
    target_spec = peewee.TextField()
    priority = peewee.CharField(max_length=8)
    nonce = peewee.TextField()
    ciphertext = peewee.TextField()
    created_at = peewee.DateTimeField()
    delivered_at = peewee.DateTimeField(null=True)
    expires_at = peewee.DateTimeField()
    client_message_id = peewee.TextField(null=True)
    request_fingerprint = peewee.TextField(null=True)
    claimed_at = peewee.DateTimeField(null=True)
    claim_id = peewee.CharField(max_length=40, null=True)
    claim_expires_at = peewee.DateTimeField(null=True)
    # Schema 3: a DM that can no longer be delivered (expired, recipient removed) and
    # whether its sender's daemon has been told (meshd extension `undelivered`).
    undelivered_at = peewee.DateTimeField(null=True)
    undelivered_reason = peewee.TextField(null=True)
    sender_notified_at = peewee.DateTimeField(null=True)

    class Meta:
        table_name = 'message_queue'
        # The drain reads (mesh, undelivered, target) in created order; idempotency reads by
        # client_message_id; release by claim_id; the TTL sweep by expires_at; the notices
        # of undelivered DMs by sender; a send's duplicate check by (sender, client id).
        indexes = ((('mesh_id', 'delivered_at', 'target_spec'), False),
                   (('client_message_id',), False), (('claim_id',), False),
                   (('expires_at',), False), (('delivered_at',), False),
                   (('sender_member_id', 'undelivered_at'), False),
                   (('sender_member_id', 'client_message_id'), False))

    # -- sends -----------------------------------------------------------------------

    @classmethod
    def insert_row(cls, row):
        """Queue one message (hand-written: one per send)."""
        run_sql('INSERT INTO message_queue (%s) VALUES (%s)' % (', '.join(row), placeholders(row)),
             list(row.values()))

    @classmethod
    def find_duplicate(cls, mesh_id, member_id, cmid, fingerprint, now):
        """The id of an unexpired row of the same sender, client id and fingerprint."""
        params = [mesh_id, member_id, cmid, now]
        if fingerprint is None:
            same_body = 'request_fingerprint IS NULL'
        else:
            same_body = 'request_fingerprint = ?'
            params.append(fingerprint)
        row = run_sql('SELECT id FROM message_queue WHERE mesh_id = ? AND sender_member_id = ? '
                   'AND client_message_id = ? AND expires_at > ? AND %s '
                   'ORDER BY created_at, id LIMIT 1' % same_body, params).fetchone()
        return row[0] if row is not None else None

    # -- claims and acks -------------------------------------------------------------

    @classmethod
    def claim_batch(cls, mesh_id, targets, priorities, presence_id, now, lease, limit,
                    unclaimed_only=False):
        """Claim up to `limit` deliverable rows for a presence, oldest first; return them.

        `unclaimed_only` leaves rows whose claim merely expired to a real trigger (§7.10).
        """
        claimable = cls.claim_id.is_null()
        if not unclaimed_only:
            claimable = claimable | (cls.claim_expires_at < now)
        where = ((cls.mesh_id == mesh_id) & cls.delivered_at.is_null() & claimable
                 & (cls.expires_at > now) & cls.undelivered_at.is_null()
                 & cls.target_spec.in_(sorted(targets)) & cls.priority.in_(list(priorities)))
        ids = [r.id for r in cls.select(cls.id).where(where)
               .order_by(cls.created_at, cls.id).limit(limit)]
        if not ids:
            return []
        (cls.update(claimed_at=now, claim_id=presence_id,
                    claim_expires_at=now + datetime.timedelta(seconds=lease))
         .where(cls.id.in_(ids) & cls.delivered_at.is_null()
                & (cls.claim_id.is_null() | (cls.claim_expires_at < now)))
         .execute())
        return list(cls.select()
                    .where(cls.id.in_(ids) & (cls.claim_id == presence_id))
                    .order_by(cls.created_at, cls.id))

    @classmethod
    def ack(cls, mesh_id, own_keys, broker_id, client_id, presence_id, now):
        """A client_ack (§4.2): the row is delivered and its claim cleared.

        The broker's id names exactly one row. A client_message_id is chosen by each
        sender, so two senders may use the same one: matching it too (the reference's
        `id = ? OR client_message_id = ?`) let an ack of one sender's DM mark another
        sender's DM delivered, unread. Without a broker id, only a row this presence holds
        the claim of (one that was pushed to it) can be acked by its client id.
        """
        if broker_id is not None:
            match, params = 'id = ?', [now, mesh_id, broker_id]
        else:
            match, params = 'client_message_id = ? AND claim_id = ?', [now, mesh_id, client_id,
                                                                       presence_id]
        keys = sorted(own_keys)
        return run_sql('UPDATE message_queue SET delivered_at = ?, claimed_at = NULL, '
                    'claim_id = NULL, claim_expires_at = NULL WHERE mesh_id = ? '
                    'AND delivered_at IS NULL AND %s AND (target_spec IN (%s) '
                    "OR target_spec LIKE '@%%' OR target_spec LIKE '#%%')"
                    % (match, placeholders(keys)), params + keys).rowcount

    @classmethod
    def release_rows(cls, ids, presence_id):
        """Free the claims a presence holds on `ids` (a push to it failed)."""
        return (cls.update(claimed_at=None, claim_id=None, claim_expires_at=None)
                .where(cls.id.in_(ids) & (cls.claim_id == presence_id)
                       & cls.delivered_at.is_null())
                .execute())

    @classmethod
    def release_claims(cls, presence_id):
        """Free every claim of a presence; return the targets of the rows it held."""
        targets = {r.target_spec for r in cls.select(cls.target_spec)
                   .where((cls.claim_id == presence_id) & cls.delivered_at.is_null())}
        if targets:
            (cls.update(claimed_at=None, claim_id=None, claim_expires_at=None)
             .where((cls.claim_id == presence_id) & cls.delivered_at.is_null())
             .execute())
        return targets

    @classmethod
    def release_orphans(cls, live_ids):
        """Free claims whose holder is not among the live presences (missed paths, an old
        process); return how many."""
        where = cls.claim_id.is_null(False) & cls.delivered_at.is_null()
        if live_ids:
            where &= cls.claim_id.not_in(list(live_ids))
        return cls.update(claimed_at=None, claim_id=None, claim_expires_at=None).where(
            where).execute()

    @classmethod
    def release_all_claims(cls):
        """Every claim (a previous process died without its shutdown path, §7.6)."""
        return (cls.update(claimed_at=None, claim_id=None, claim_expires_at=None)
                .where(cls.claim_id.is_null(False)).execute())

    # -- what became of a send (meshd extension `message_status`) ----------------------

    @classmethod
    def sent_by(cls, mesh_id, member_id, message_id=None, client_message_id=None):
        """One row this member sent, by the broker's id, else the newest with this client
        id; None when there is none. Another sender's rows are never matched: a client id
        is chosen by each sender, and a broker id must not reveal another member's DM."""
        where = (cls.mesh_id == mesh_id) & (cls.sender_member_id == member_id)
        if message_id is not None:
            return cls.select().where(where & (cls.id == message_id)).first()
        return (cls.select().where(where & (cls.client_message_id == client_message_id))
                .order_by(cls.created_at.desc(), cls.id.desc()).first())

    # -- undelivered DMs -------------------------------------------------------------

    @classmethod
    def mark_undelivered(cls, now, expired_reason, removed_reason):
        """DMs past their TTL and not claimed (a push in flight may still be acked), and DMs
        to the member key of a removed member, become undelivered; return both counts."""
        pending = 'delivered_at IS NULL AND undelivered_at IS NULL'
        expired = run_sql('UPDATE message_queue SET undelivered_at = ?, undelivered_reason = ? '
                       'WHERE %s AND expires_at <= ? AND (claim_id IS NULL '
                       'OR claim_expires_at < ?)' % pending,
                       (now, expired_reason, now, now)).rowcount
        removed = run_sql('UPDATE message_queue SET undelivered_at = ?, undelivered_reason = ? '
                       'WHERE %s AND target_spec IN (SELECT m.peer_pubkey FROM member m WHERE '
                       'm.mesh_id = message_queue.mesh_id AND m.revoked_at IS NOT NULL) '
                       'AND target_spec NOT IN (SELECT m.peer_pubkey FROM member m WHERE '
                       'm.mesh_id = message_queue.mesh_id AND m.revoked_at IS NULL)' % pending,
                       (now, removed_reason)).rowcount
        return expired, removed

    @classmethod
    def undelivered_of(cls, mesh_id, member_id, limit):
        """(id, client id, target, reason, created, undelivered) of a sender's undelivered
        DMs whose notice its daemon has not acked, oldest first."""
        return [(row_id, cmid, target, reason, as_datetime(created), as_datetime(undelivered))
                for row_id, cmid, target, reason, created, undelivered in run_sql(
                    'SELECT id, client_message_id, target_spec, undelivered_reason, created_at, '
                    'undelivered_at FROM message_queue WHERE mesh_id = ? '
                    'AND sender_member_id = ? AND undelivered_at IS NOT NULL '
                    'AND sender_notified_at IS NULL ORDER BY undelivered_at, id LIMIT ?',
                    (mesh_id, member_id, limit)).fetchall()]

    @classmethod
    def notice_acked(cls, row_id, member_id, now):
        return run_sql('UPDATE message_queue SET sender_notified_at = ? WHERE id = ? '
                    'AND sender_member_id = ? AND undelivered_at IS NOT NULL',
                    (now, row_id, member_id)).rowcount

    @classmethod
    def prune(cls, cutoff):
        """Delivered rows older than `cutoff`, undelivered ones once their sender was told
        (or undelivered before `cutoff`); return (undelivered, delivered) removed."""
        undelivered = cls.delete().where(cls.undelivered_at.is_null(False)
                                         & (cls.sender_notified_at.is_null(False)
                                            | (cls.undelivered_at < cutoff))).execute()
        delivered = cls.delete().where(cls.delivered_at.is_null(False)
                                       & (cls.delivered_at < cutoff)).execute()
        return undelivered, delivered
