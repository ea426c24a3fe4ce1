"""`send`, drains, claims, fan-out and `client_ack` (spec/wire.md §4.1, §4.2, §7).

DMs always go through the queue: insert, ack, then a drain claims rows for a live connection
(30 s lease, `claim_id` = its presence id) and pushes them after the claim commits; only a
`client_ack` marks a row delivered. Claims die with their holder: `release()` frees them when a
presence goes offline or is removed and re-drains the recipient's live connections at once
(§7.10). Multicast is pushed live to each recipient and marked delivered after the loop (§7.4).
No socket is written inside a transaction.
"""
import datetime
import logging
import re

from meshd.broker import protocol, store
from meshd.broker.presence import group_targets

log = logging.getLogger(__name__)

CLAIM_BATCH = 100
LOWER_HEX64 = re.compile(r'^[0-9a-f]{64}$')
MULTICAST_ALL = ('*', '@all')


def grant_allows(grants, sender_member_pubkey, sender_session_pubkey, capability):
    """The recipient's grant rule (§8.3): member key entry, else session key entry, else defaults."""
    if not isinstance(grants, dict):
        grants = {}
    if sender_member_pubkey in grants:
        caps = grants[sender_member_pubkey]
    elif sender_session_pubkey and sender_session_pubkey in grants:
        caps = grants[sender_session_pubkey]
    else:
        caps = protocol.DEFAULT_CAPS
    return isinstance(caps, (list, tuple)) and capability in caps


def _member_grants(member_id, cache):
    if member_id not in cache:
        member = store.Member.get_or_none(store.Member.id == member_id)
        cache[member_id] = store.loads(member.peer_grants, {}) if member is not None else {}
    return cache[member_id]


class Delivery(object):
    """The message paths of one broker; `on_dead(entry)` runs the close path of a failed socket."""

    def __init__(self, registry, limiter, max_message_bytes, dm_ttl, lease, hook_fresh, on_dead):
        self.registry = registry
        self.limiter = limiter
        self.max_message_bytes = max_message_bytes
        self.dm_ttl = dm_ttl
        self.lease = lease
        self.hook_fresh = hook_fresh
        self.on_dead = on_dead

    # ------------------------------------------------------------------ send

    def oversize_answer(self, frame, length):
        """Step 0: the answer to a frame above MAX_MESSAGE_BYTES (nothing consumed or stored)."""
        if isinstance(frame, dict) and frame.get('type') == 'send':
            return protocol.ack(frame.get('id'), err=protocol.ERR_TOO_LARGE
                                % (length, self.max_message_bytes))
        req_id = frame.get('_reqId') if isinstance(frame, dict) else None
        return protocol.error('payload_too_large', 'frame of %d bytes > MAX_MESSAGE_BYTES=%d'
                              % (length, self.max_message_bytes),
                              req_id=req_id if isinstance(req_id, str) else None)

    def handle_send(self, entry, frame):
        """Run `send` steps 1–6 for a frame from `entry` and write the ack (then fan out)."""
        msg_id = frame.get('id') if isinstance(frame.get('id'), str) else ''

        def refuse(err):
            entry.send(protocol.ack(msg_id, err=err))

        if not self.limiter.take(entry.member_id):
            return refuse(protocol.ERR_RATE_LIMIT % (self.limiter.per_min, self.limiter.burst))
        target, nonce, ciphertext = frame.get('targetSpec'), frame.get('nonce'), frame.get('ciphertext')
        priority = frame.get('priority')
        if not all(isinstance(v, str) for v in (target, nonce, ciphertext)):
            return refuse(protocol.ERR_BAD_FIELDS)
        if priority not in protocol.PRIORITIES:
            return refuse(protocol.ERR_BAD_PRIORITY)
        size = len(ciphertext) + len(nonce) + len(target)
        if size > self.max_message_bytes:
            return refuse(protocol.ERR_TOO_LARGE % (size, self.max_message_bytes))
        cmid = frame.get('client_message_id') if isinstance(frame.get('client_message_id'), str) else None
        fingerprint = frame.get('request_fingerprint')
        fingerprint = fingerprint if isinstance(fingerprint, str) else None
        now = protocol.utcnow()
        if cmid is not None:
            existing = self._find_duplicate(entry, cmid, fingerprint, now)
            if existing is not None:
                return entry.send(protocol.ack(msg_id, existing, queued=True))
        if target.startswith('#'):
            return refuse(protocol.ERR_TOPIC)
        is_multicast = target in MULTICAST_ALL or target.startswith('@')
        candidates = []
        if not is_multicast:
            candidates, err = self._preflight(entry, target)
            if err:
                return refuse(err)
        row_id = protocol.new_id()
        with store.writing():
            store.MessageQueue.create(
                id=row_id, mesh_id=entry.mesh_id, sender_member_id=entry.member_id,
                sender_session_pubkey=entry.session_pubkey, target_spec=target, priority=priority,
                nonce=nonce, ciphertext=ciphertext, created_at=now,
                # A multicast is pushed live, never drained: stored delivered so that no
                # concurrent drain claims it and sends a second copy (review finding).
                delivered_at=now if is_multicast else None,
                expires_at=now + datetime.timedelta(seconds=self.dm_ttl),
                client_message_id=cmid, request_fingerprint=fingerprint)
        entry.send(protocol.ack(msg_id, row_id, queued=True))
        if is_multicast:
            self._fan_out_multicast(entry, row_id, target, priority, nonce, ciphertext, now)
        else:
            self._fan_out_dm(entry, target, candidates)

    def _find_duplicate(self, entry, cmid, fingerprint, now):
        MQ = store.MessageQueue
        fp_clause = MQ.request_fingerprint.is_null() if fingerprint is None else (
            MQ.request_fingerprint == fingerprint)
        row = (MQ.select(MQ.id)
               .where((MQ.mesh_id == entry.mesh_id) & (MQ.sender_member_id == entry.member_id)
                      & (MQ.client_message_id == cmid) & fp_clause & (MQ.expires_at > now))
               .order_by(MQ.created_at, MQ.id)
               .first())
        return row.id if row is not None else None

    def _preflight(self, entry, target):
        """Step 3 with store-and-forward (§4.1, §7.9); return (candidate member ids, error)."""
        if not LOWER_HEX64.match(target):
            return [], protocol.ERR_NO_PEER
        candidates = [e for e in self.registry.in_mesh(entry.mesh_id)
                      if e is not entry and target in e.keys()]
        member_ids = {e.member_id for e in candidates}
        if not candidates:
            member = store.Member.active(entry.mesh_id, target)
            if member is not None:
                siblings = [e for e in self.registry.in_mesh(entry.mesh_id)
                            if e is not entry and e.member_id == member.id]
                member_ids = {member.id}
                if not siblings and target in entry.keys():
                    return [], protocol.ERR_NO_PEER     # own key, no other session
            else:
                offline = self._known_session_owner(entry.mesh_id, target)
                if offline is None or target in entry.keys():
                    return [], protocol.ERR_NO_PEER
                member_ids = {offline}
        cache = {}
        if not any(grant_allows(_member_grants(mid, cache), entry.member_pubkey,
                                entry.session_pubkey, 'dm') for mid in member_ids):
            return [], protocol.ERR_BLOCKED
        return member_ids, None

    def _known_session_owner(self, mesh_id, session_pubkey):
        """Member id of a non-revoked member whose session presence used this key, or None."""
        P, M = store.Presence, store.Member
        row = (P.select(P.member_id)
               .join(M, on=(P.member_id == M.id))
               .where((P.mesh_id == mesh_id) & (P.session_pubkey == session_pubkey)
                      & (P.role == 'session') & M.revoked_at.is_null())
               .first())
        return row.member_id if row is not None else None

    # ------------------------------------------------------------------ fan-out

    def _fan_out_dm(self, sender, target, member_ids):
        exclude = sender.session_pubkey
        for entry in self.registry.live(sender.mesh_id):
            if entry is sender:
                continue
            if target in entry.keys() or entry.member_id in member_ids:
                self.drain(entry, exclude_broadcast_from=exclude)

    def _fan_out_multicast(self, sender, row_id, target, priority, nonce, ciphertext, now):
        frame = protocol.multicast_push(row_id, sender.mesh_id, _SenderView(sender), priority,
                                        nonce, ciphertext, now)
        cache = {}
        for entry in self.registry.live(sender.mesh_id):
            if entry.member_id == sender.member_id or not entry.visible:
                continue
            if target not in MULTICAST_ALL and target not in group_targets(entry.groups):
                continue
            if not grant_allows(_member_grants(entry.member_id, cache), sender.member_pubkey,
                                sender.session_pubkey, 'broadcast'):
                continue
            if not entry.send(frame):
                self.on_dead(entry)

    # ------------------------------------------------------------------ drains

    def _allowed_priorities(self, entry, now):
        # §7.5 without disk inference: dnd and a fresh hook status hold; anything else is idle.
        fresh_hook = (entry.status_source == 'hook' and entry.status_updated_at is not None
                      and (now - entry.status_updated_at).total_seconds() < self.hook_fresh)
        if entry.status != 'dnd' and not fresh_hook:
            entry.status, entry.status_source = 'idle', 'jsonl'
        return protocol.PRIORITIES if entry.status == 'idle' else ('now',)

    def drain(self, entry, exclude_broadcast_from=None, unclaimed_only=False):
        """Claim and push every eligible row for a live entry, in batches, FIFO; return the count.

        `unclaimed_only` is the sweeper's variant: rows whose claim merely expired wait for a
        real trigger (§7.10 rule 6), so a client that never acks is not re-sent every sweep.
        """
        pushed = 0
        while entry.is_live:
            now = protocol.utcnow()
            rows = self._claim_batch(entry, now, exclude_broadcast_from, unclaimed_only)
            if not rows:
                break
            senders = {}
            for index, row in enumerate(rows):
                frame = protocol.drained_push(row, entry.mesh_id, self._sender_pubkey(row, senders))
                if not entry.send(frame):
                    self._release_rows([r.id for r in rows[index:]], entry.presence_id)
                    self.on_dead(entry)
                    return pushed
                pushed += 1
            if len(rows) < CLAIM_BATCH:
                break
        if pushed:
            log.debug('drained %d rows to presence %s', pushed, entry.presence_id)
        return pushed

    def _claim_batch(self, entry, now, exclude_broadcast_from, unclaimed_only):
        MQ = store.MessageQueue
        targets = {entry.member_pubkey, '*', '@all'} | group_targets(entry.groups)
        if entry.session_pubkey:
            targets.add(entry.session_pubkey)
        claimable = MQ.claim_id.is_null()
        if not unclaimed_only:
            claimable = claimable | (MQ.claim_expires_at < now)
        where = ((MQ.mesh_id == entry.mesh_id) & MQ.delivered_at.is_null() & claimable
                 & (MQ.expires_at > now) & MQ.target_spec.in_(sorted(targets))
                 & MQ.priority.in_(list(self._allowed_priorities(entry, now))))
        if exclude_broadcast_from:
            where &= ~((MQ.target_spec == '*') & (MQ.sender_session_pubkey == exclude_broadcast_from))
        with store.writing():
            ids = [r.id for r in MQ.select(MQ.id).where(where)
                   .order_by(MQ.created_at, MQ.id).limit(CLAIM_BATCH)]
            if not ids:
                return []
            (MQ.update(claimed_at=now, claim_id=entry.presence_id,
                       claim_expires_at=now + datetime.timedelta(seconds=self.lease))
             .where(MQ.id.in_(ids) & MQ.delivered_at.is_null()
                    & (MQ.claim_id.is_null() | (MQ.claim_expires_at < now)))
             .execute())
            return list(MQ.select()
                        .where(MQ.id.in_(ids) & (MQ.claim_id == entry.presence_id))
                        .order_by(MQ.created_at, MQ.id))

    def _sender_pubkey(self, row, cache):
        if row.sender_session_pubkey:
            return row.sender_session_pubkey
        if row.sender_member_id not in cache:
            member = store.Member.get_or_none(store.Member.id == row.sender_member_id)
            cache[row.sender_member_id] = member.peer_pubkey if member is not None else ''
        return cache[row.sender_member_id]

    # ------------------------------------------------------------------ acks and releases

    def client_ack(self, entry, frame):
        """Mark the acked row delivered and clear its claim (§4.2); no reply."""
        cmid, bmid = frame.get('clientMessageId'), frame.get('brokerMessageId')
        cmid = cmid if isinstance(cmid, str) and cmid else None
        bmid = bmid if isinstance(bmid, str) and bmid else None
        if cmid is None and bmid is None:
            return
        MQ = store.MessageQueue
        match = None
        if bmid is not None:
            match = MQ.id == bmid
        if cmid is not None:
            by_cmid = MQ.client_message_id == cmid
            match = by_cmid if match is None else (match | by_cmid)
        own = MQ.target_spec.in_(sorted(entry.keys() | {'*'}))
        own = own | MQ.target_spec.startswith('@') | MQ.target_spec.startswith('#')
        with store.writing():
            (MQ.update(delivered_at=protocol.utcnow(), claimed_at=None, claim_id=None,
                       claim_expires_at=None)
             .where((MQ.mesh_id == entry.mesh_id) & MQ.delivered_at.is_null() & match & own)
             .execute())

    def _release_rows(self, ids, presence_id):
        MQ = store.MessageQueue
        with store.writing():
            (MQ.update(claimed_at=None, claim_id=None, claim_expires_at=None)
             .where(MQ.id.in_(ids) & (MQ.claim_id == presence_id) & MQ.delivered_at.is_null())
             .execute())

    def release(self, entry):
        """Free the claims of an entry that went offline or was removed; re-push them (§7.10)."""
        MQ = store.MessageQueue
        with store.writing():
            rows = list(MQ.select(MQ.target_spec)
                        .where((MQ.claim_id == entry.presence_id) & MQ.delivered_at.is_null()))
            if rows:
                (MQ.update(claimed_at=None, claim_id=None, claim_expires_at=None)
                 .where((MQ.claim_id == entry.presence_id) & MQ.delivered_at.is_null())
                 .execute())
        if rows:
            log.info('released %d claims of presence %s', len(rows), entry.presence_id)
            self.repush(entry.mesh_id, {r.target_spec for r in rows})

    def repush(self, mesh_id, targets):
        """Drain every live entry of the mesh that one of `targets` addresses."""
        for other in self.registry.live(mesh_id):
            if other.keys() & targets:
                self.drain(other)

    def release_orphans(self):
        """Sweeper (a): free claims whose holder is not a live entry (missed paths, old process)."""
        live_ids = [e.presence_id for e in self.registry.live()]
        MQ = store.MessageQueue
        where = MQ.claim_id.is_null(False) & MQ.delivered_at.is_null()
        if live_ids:
            where &= MQ.claim_id.not_in(live_ids)
        with store.writing():
            return (MQ.update(claimed_at=None, claim_id=None, claim_expires_at=None)
                    .where(where).execute())

    def expire(self, now=None):
        """Hourly TTL sweep: drop expired undelivered rows and delivered rows older than the TTL."""
        now = now or protocol.utcnow()
        MQ = store.MessageQueue
        cutoff = now - datetime.timedelta(seconds=self.dm_ttl)
        with store.writing():
            expired = MQ.delete().where(MQ.delivered_at.is_null() & (MQ.expires_at <= now)).execute()
            delivered = MQ.delete().where(MQ.delivered_at.is_null(False)
                                          & (MQ.delivered_at < cutoff)).execute()
            P = store.Presence
            P.delete().where(P.disconnected_at.is_null(False) & (P.disconnected_at < cutoff)).execute()
        return expired, delivered


class _SenderView(object):
    """The sender fields of push (b), taken from the sending connection."""

    def __init__(self, entry):
        self.pubkey = entry.pubkey
        self.member_pubkey = entry.member_pubkey
        self.member_id = entry.member_id
        self.display_name = entry.display_name
