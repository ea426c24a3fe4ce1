"""`send`, drains, claims, fan-out and `client_ack` (spec/wire.md §4.1, §4.2, §7).

DMs always go through the queue: insert, ack, then a drain claims rows for a live connection
(30 s lease, `claim_id` = its presence id) and pushes them after the claim commits; only a
`client_ack` marks a row delivered. Claims die with their holder: `release()` frees them when a
presence goes offline or is removed and re-drains the recipient's live connections at once
(§7.10). Multicast is pushed live to each recipient and marked delivered after the loop (§7.4).
No socket is written inside a transaction.
"""
import collections
import datetime
import logging

from meshd import clock, crypto
from meshd.broker import protocol
from meshd.broker.message_queue import MessageQueue
from meshd.broker.models import Member, Presence
from meshd.broker.presence import group_targets
from meshd.greenlets import LOG

log = logging.getLogger(__name__)

CLAIM_BATCH = 100
UNDELIVERED_EXPIRED = 'expired'
UNDELIVERED_REMOVED = 'recipient_removed'
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
        cache[member_id] = Member.grants_of(member_id)
    return cache[member_id]


class Delivery(object):
    """The message paths of one broker, over the connection map `presences` and `store`.

    `supervisor` runs the ack and drain greenlets; `on_dead(entry)` runs the close path of
    a socket a write to failed. The limits: the per-member `limiter`, `max_message_bytes`,
    the DM TTL `dm_ttl` and the claim `lease` (seconds); a hook status fresher than
    `hook_fresh` seconds holds next/low messages.
    """

    def __init__(self, presences, store, supervisor, limiter, max_message_bytes, dm_ttl, lease,
                 hook_fresh, on_dead):
        self.presences = presences
        self.store = store
        self.supervisor = supervisor
        self.limiter = limiter
        self.max_message_bytes = max_message_bytes
        self.dm_ttl = dm_ttl
        self.lease = lease
        self.hook_fresh = hook_fresh
        self.on_dead = on_dead
        self._last_created = None

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

    def handle_send(self, entry, frame, acks):
        """Run `send` steps 1–6 for a frame from `entry`; the ack and fan-out follow the commit.

        `acks` is the connection's AckPipeline: the row is queued to the group writer and
        this returns at once, so the next frame is read while the row is being committed.
        """
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
        now = self._created_at()
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
        row = dict(
            id=protocol.new_id(), mesh_id=entry.mesh_id, sender_member_id=entry.member_id,
            sender_session_pubkey=entry.session_pubkey, target_spec=target, priority=priority,
            nonce=nonce, ciphertext=ciphertext, created_at=now,
            # A multicast is pushed live, never drained: stored delivered so that no
            # concurrent drain claims it and sends a second copy (review finding).
            delivered_at=now if is_multicast else None,
            expires_at=now + datetime.timedelta(seconds=self.dm_ttl),
            client_message_id=cmid, request_fingerprint=fingerprint)

        def fan_out(stored):
            row_id, created = stored
            if not created:
                return      # an earlier copy of this send was stored (and fanned out) first
            if is_multicast:
                self._fan_out_multicast(entry, row_id, target, priority, nonce, ciphertext, now)
            else:
                self._fan_out_dm(entry, target, candidates)
        acks.add(msg_id, self.store.writer.write_async(self._store_send, entry, row), fan_out)

    def _created_at(self):
        """Now, but strictly later than the last send's: drains read in created_at order,
        and sends accepted in one millisecond had only their random ids to order them."""
        now = clock.utcnow()
        if self._last_created is not None and now <= self._last_created:
            now = self._last_created + datetime.timedelta(microseconds=1)
        self._last_created = now
        return now

    def _store_send(self, entry, row):
        """In the writer: the id of an earlier row for the same send, else insert `row`."""
        if row['client_message_id'] is not None:
            existing = self._find_duplicate(entry, row['client_message_id'],
                                            row['request_fingerprint'], row['created_at'])
            if existing is not None:
                return existing, False
        MessageQueue.insert_row(row)
        return row['id'], True

    @staticmethod
    def _find_duplicate(entry, cmid, fingerprint, now):
        return MessageQueue.find_duplicate(entry.mesh_id, entry.member_id, cmid, fingerprint, now)

    def _preflight(self, entry, target):
        """Step 3 with store-and-forward (§4.1, §7.9); return (candidate member ids, error)."""
        if not crypto.is_hex64(target):
            return [], protocol.ERR_NO_PEER
        candidates = [e for e in self.presences.in_mesh(entry.mesh_id)
                      if e is not entry and target in e.keys()]
        member_ids = {e.member_id for e in candidates}
        if not candidates:
            member = Member.active(entry.mesh_id, target)
            if member is not None:
                siblings = [e for e in self.presences.in_mesh(entry.mesh_id)
                            if e is not entry and e.member_id == member.id]
                member_ids = {member.id}
                if not siblings and target in entry.keys():
                    return [], protocol.ERR_NO_PEER     # own key, no other session
            else:
                offline = Presence.session_owner(entry.mesh_id, target)
                if offline is None or target in entry.keys():
                    return [], protocol.ERR_NO_PEER
                member_ids = {offline}
        cache = {}
        if not any(grant_allows(_member_grants(mid, cache), entry.member_pubkey,
                                entry.session_pubkey, 'dm') for mid in member_ids):
            return [], protocol.ERR_BLOCKED
        return member_ids, None

    # ------------------------------------------------------------------ fan-out

    def _fan_out_dm(self, sender, target, member_ids):
        for entry in self.presences.live(sender.mesh_id):
            if entry is sender:
                continue
            if target in entry.keys() or entry.member_id in member_ids:
                self.request_drain(entry)

    def request_drain(self, entry):
        """Drain `entry` soon. Requests made while its drain runs fold into one more pass, so
        a burst of sends to one recipient costs a claim per batch, not a claim per send."""
        entry.drain_requested = True
        if entry.drainer is None or entry.drainer.dead:
            entry.drainer = self.spawn_worker('drain', self._drain_requested, entry)

    def spawn_worker(self, name, fn, *args):
        """Start an ack or drain greenlet; the broker's stop waits for them before its
        writer stops."""
        return self.supervisor.spawn(name, fn, *args, on_crash=LOG)

    def _drain_requested(self, entry):
        # Checked again after the connection is returned: returning it can yield (PostgreSQL),
        # and a request made meanwhile saw this greenlet alive and spawned none.
        while entry.drain_requested:
            with self.store.connection():
                while entry.drain_requested:
                    entry.drain_requested = False
                    self.drain(entry)

    def _fan_out_multicast(self, sender, row_id, target, priority, nonce, ciphertext, now):
        frame = protocol.multicast_push(row_id, sender.mesh_id, _SenderView(sender), priority,
                                        nonce, ciphertext, now)
        cache = {}
        for entry in self.presences.live(sender.mesh_id):
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

    def drain(self, entry, unclaimed_only=False):
        """Claim and push every eligible row for a live entry, in batches, FIFO; return the count.

        `unclaimed_only` is the sweeper's variant: rows whose claim merely expired wait for a
        real trigger (§7.10 rule 6), so a client that never acks is not re-sent every sweep.
        """
        pushed = 0
        while entry.is_live:
            now = clock.utcnow()
            rows = self._claim_batch(entry, now, unclaimed_only)
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

    def _claim_batch(self, entry, now, unclaimed_only):
        targets = {entry.member_pubkey, '*', '@all'} | group_targets(entry.groups)
        if entry.session_pubkey:
            targets.add(entry.session_pubkey)
        # A claim is a lease: lost in a crash or a rolled-back batch, its rows are merely
        # claimable again and pushed once more (receivers deduplicate). So the push need not
        # wait for the claim's commit and fsync: it waits only until the claim ran.
        return self.store.writer.execute(
            MessageQueue.claim_batch, entry.mesh_id, targets,
            self._allowed_priorities(entry, now), entry.presence_id, now, self.lease,
            CLAIM_BATCH, unclaimed_only)

    @staticmethod
    def _sender_pubkey(row, cache):
        if row.sender_session_pubkey:
            return row.sender_session_pubkey
        if row.sender_member_id not in cache:
            cache[row.sender_member_id] = Member.pubkey_of(row.sender_member_id)
        return cache[row.sender_member_id]

    # ------------------------------------------------------------------ acks and releases

    def client_ack(self, entry, frame):
        """Mark the acked row delivered and clear its claim (§4.2); no reply."""
        cmid, bmid = frame.get('clientMessageId'), frame.get('brokerMessageId')
        cmid = cmid if isinstance(cmid, str) and cmid else None
        bmid = bmid if isinstance(bmid, str) and bmid else None
        if cmid is None and bmid is None:
            return
        # Nobody waits for this commit: the ack has no reply, and a lost one only means the
        # row is pushed again after its lease (the client deduplicates).
        self.store.writer.submit(MessageQueue.ack, entry.mesh_id, entry.keys() | {'*'}, bmid,
                                 cmid, entry.presence_id, clock.utcnow())

    def _release_rows(self, ids, presence_id):
        with self.store.writing():
            MessageQueue.release_rows(ids, presence_id)

    def release(self, entry):
        """Free the claims of an entry that went offline or was removed; re-push them (§7.10)."""
        with self.store.writing():
            targets = MessageQueue.release_claims(entry.presence_id)
        if targets:
            log.info('released claims of presence %s', entry.presence_id)
            self.repush(entry.mesh_id, targets)

    def repush(self, mesh_id, targets):
        """Drain every live entry of the mesh that one of `targets` addresses."""
        for other in self.presences.live(mesh_id):
            if other.keys() & targets:
                self.drain(other)

    def release_orphans(self):
        """Sweeper (a): free claims whose holder is not a live entry (missed paths, old process)."""
        live_ids = [e.presence_id for e in self.presences.live()]
        with self.store.writing():
            return MessageQueue.release_orphans(live_ids)

    def mark_undelivered(self, now=None):
        """Sweeper: DMs that can no longer be delivered become undelivered, with a reason
        (their senders are told by meshd/broker/notices.py); return {reason: count}."""
        now = now or clock.utcnow()
        with self.store.writing():
            expired, removed = MessageQueue.mark_undelivered(now, UNDELIVERED_EXPIRED,
                                                             UNDELIVERED_REMOVED)
        if expired or removed:
            log.info('undelivered DMs: %d expired, %d to removed members', expired, removed)
        return {UNDELIVERED_EXPIRED: expired, UNDELIVERED_REMOVED: removed}

    def expire(self, now=None):
        """Hourly TTL sweep: drop delivered rows older than the TTL, undelivered rows once
        their sender was told (or one more TTL later), and old disconnected presences."""
        now = now or clock.utcnow()
        cutoff = now - datetime.timedelta(seconds=self.dm_ttl)
        self.mark_undelivered(now)
        with self.store.writing():
            undelivered, delivered = MessageQueue.prune(cutoff)
            Presence.prune(cutoff)
        return undelivered, delivered


class AckPipeline(object):
    """Answers the sends of one connection in arrival order, each once its row committed.

    The connection's reading greenlet queues each accepted send here and reads on, so the
    sends a daemon keeps in flight are committed together by the group writer instead of
    one commit (and one fsync) each. A greenlet of the pipeline waits for each commit in
    turn, writes the ack on the socket the send came in on, then runs the send's fan-out.
    """

    def __init__(self, ws, store, spawn):
        self.ws = ws
        self.store = store
        self.spawn = spawn
        self._pending = collections.deque()
        self._greenlet = None

    def add(self, msg_id, committed, then):
        """Queue the ack of send `msg_id`; `then(value)` runs after the ack is written."""
        self._pending.append((msg_id, committed, then))
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = self.spawn('acks', self._run)

    def _run(self):
        # The outer check runs after the connection is returned, which can yield (PostgreSQL):
        # a send queued meanwhile saw this greenlet alive and spawned none.
        while self._pending:
            with self.store.connection():
                self._answer_pending()

    def _answer_pending(self):
        while self._pending:
            msg_id, committed, then = self._pending.popleft()
            try:
                stored = committed.get()
            except Exception:
                log.exception('storing send %s failed', msg_id)
                self.ws.send_json(protocol.ack(msg_id, err=protocol.ERR_INTERNAL))
                continue
            # A closed socket only loses the ack: the row is stored, the sender retries
            # with the same client_message_id and gets this row's id back.
            self.ws.send_json(protocol.ack(msg_id, stored[0], queued=True))
            try:
                then(stored)
            except Exception:
                log.exception('fan-out of %s failed', stored[0])


class _SenderView(object):
    """The sender fields of push (b), taken from the sending connection."""

    def __init__(self, entry):
        self.pubkey = entry.pubkey
        self.member_pubkey = entry.member_pubkey
        self.member_id = entry.member_id
        self.display_name = entry.display_name
