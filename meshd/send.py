"""The `send` pipeline: check, resolve, seal, accept durably (spec/daemon.md §8.3, §3.1).

Every failure to resolve the target happens before any outbox or idempotency row exists,
so a refused send never consumes its client_message_id. The accepted row and its
idempotency key are committed in one transaction before `send` answers (the answer is a
Pending that completes after the group commit); the drain is woken after the commit.
The target is resolved by meshd/resolver.py (rosters read concurrently, outside any
transaction, and the address book). The Sender sees the daemon through what its constructor
gives it: the store, the LinkTable (joined meshes, what each broker announced), the
resolver, the timings and a way to wake the drain.
"""
import uuid

from peewee import IntegrityError
from rpc.connection import Pending
from rpc.protocol import (CONFLICT, INVALID_PARAMS, INVALID_REQUEST, NOT_FOUND, UPSTREAM_ERROR,
                          RpcError, invalid_params)
from storage.models import Idempotency, Outbox

from meshd import clock, crypto, wire
from meshd.clock import iso_from_ms

MAX_TTL_S = 10 * 365 * 24 * 3600  # beyond this an expiry date cannot be stored or shown


class Sender:
    """Runs `send` calls: `send(session, to, message, …)` returns a Pending answer."""

    def __init__(self, store, links, resolver, timings, wake_drain):
        self.store = store
        self.links = links
        self.resolver = resolver
        self.timings = timings
        self.wake_drain = wake_drain

    def send(self, session, to, message, mesh=None, priority=None, meta=None,
             reply_to_id=None, client_message_id=None, ttl=None, strict=False):
        """Run the pipeline for one `send` call and return its (pending) result."""
        to = (to or '').strip()
        if not to:
            raise invalid_params("missing 'to'")
        if message is None or message == '':
            raise invalid_params("missing 'message'")
        if priority is not None and priority not in wire.PRIORITIES:
            raise invalid_params("'priority' must be now, next or low")
        if ttl is not None and not 0 < ttl <= MAX_TTL_S:
            raise invalid_params("'ttl' must be a positive number of seconds, at most %d"
                                 % MAX_TTL_S)
        cmid = (client_message_id or '').strip()
        # A key we mint cannot exist yet: only a caller's key needs the idempotency lookups.
        callers_key = bool(cmid)
        cmid = cmid or str(uuid.uuid4())
        fingerprint = bytes.fromhex(crypto.request_fingerprint(
            to, priority or 'next', message, reply_to_id, meta or None))
        if callers_key:
            with self.store.reading():
                known = _decide(cmid, fingerprint)
            if known is not None:
                return known
        if to.startswith('#'):
            raise RpcError.of(INVALID_PARAMS, 'invalid_target', '#topics are not supported')
        if mesh is not None and mesh not in self.links.meshes:
            raise RpcError.of(NOT_FOUND, 'mesh_not_attached', 'mesh not attached: %s' % mesh,
                              mesh=mesh)
        resolution = self.resolver.resolve(session, to, mesh)
        if strict and not resolution.known:
            raise RpcError.of(NOT_FOUND, 'recipient_unknown',
                              'no roster or address book of mesh "%s" has shown %s'
                              % (resolution.mesh, resolution.target), to=to,
                              mesh=resolution.mesh)
        mesh_entry = self.links.meshes[resolution.mesh]
        sender_session = None
        if (session is not None and session.presence is not None
                and session.mesh == resolution.mesh):
            sender_session = session
        secret = sender_session.presence['session_secret_key'] if sender_session else \
            mesh_entry['secretKey']
        body = message.encode('utf-8')
        try:
            if resolution.is_dm:
                nonce, ciphertext = crypto.seal_dm(body, resolution.target, secret)
            else:
                nonce, ciphertext = crypto.encode_plain(body)
        except Exception as exc:
            raise RpcError.of(UPSTREAM_ERROR, 'route_failed', 'route_failed', detail=str(exc))
        frame = wire.send_frame(cmid, fingerprint, resolution.target, priority, nonce,
                                ciphertext)
        if wire.frame_length(frame) > wire.FRAME_LIMIT:
            largest = wire.largest_message(frame, resolution.is_dm)
            raise RpcError.of(INVALID_REQUEST, 'payload_too_large',
                              "message too large: {:,} bytes; this mesh's broker takes at most "
                              "about {:,}".format(len(body), largest // 100 * 100),
                              message_bytes=len(body), max_message_bytes=largest)
        now = clock.now_ms()
        ttl_s = ttl or self.timings['outbox_ttl']
        expires_at = now + int(ttl_s * 1000)
        broker_ttl = self._shorter_broker_ttl(resolution, ttl_s)
        row = dict(id=str(uuid.uuid4()), client_message_id=cmid,
                   request_fingerprint=fingerprint, payload=body, enqueued_at=now, attempts=0,
                   next_attempt_at=now, status='pending', mesh=resolution.mesh,
                   target_spec=resolution.target, nonce=nonce, ciphertext=ciphertext,
                   priority=priority, expires_at=expires_at,
                   sender_session_pubkey=sender_session.session_pubkey
                   if sender_session else None)

        def accept():
            try:
                Outbox.accept(row, fingerprint, now)
            except IntegrityError:
                # A concurrent send with the same key won since the lookup above: answer as
                # that send's duplicate (or conflict). A key the daemon minted never clashes.
                existing = _decide(cmid, fingerprint) if callers_key else None
                if existing is None:
                    raise
                return existing
            return None

        def answer(existing):
            if existing is not None:
                return existing
            self.wake_drain()
            return {'client_message_id': cmid, 'status': 'queued', 'duplicate': False,
                    'broker_message_id': None, 'mesh': resolution.mesh,
                    'target_spec': resolution.target, 'expires_at': iso_from_ms(expires_at),
                    'recipient_name': resolution.name, 'recipient_online': resolution.online,
                    'recipient_unknown': not resolution.known, 'broker_dm_ttl': broker_ttl}
        # Answered once committed: an accepted message survives a crash (DESIGN.md 6). Until
        # then the connection reads on, so a client pipelining sends shares the commits.
        return Pending(self.store.writer.write_async(accept), answer)

    def _shorter_broker_ttl(self, resolution, ttl_s):
        """The broker's DM TTL in seconds when it would drop this DM before the daemon
        gives up on it (announced by meshd's broker in hello_ack), else None."""
        link = self.links.member(resolution.mesh)
        broker_ttl = link.broker_dm_ttl if resolution.is_dm and link is not None else None
        return broker_ttl if broker_ttl is not None and broker_ttl < ttl_s else None


# -- idempotency (spec/daemon.md §3.1.2) -------------------------------------------------

def _decide(cmid, fingerprint):
    """The answer for a key that already exists, None for a new key; raises on conflict."""
    known = Idempotency.lookup(cmid)
    if known is None:
        return None
    stored, row = known
    status = row.status if row is not None else 'aborted'
    match = stored == fingerprint
    if status in ('pending', 'inflight', 'done') and match:
        return {'client_message_id': cmid, 'status': 'queued' if status == 'pending' else status,
                'duplicate': True, 'broker_message_id': row.broker_message_id,
                'mesh': row.mesh, 'target_spec': row.target_spec,
                'expires_at': iso_from_ms(row.expires_at), 'recipient_name': None,
                'recipient_online': None, 'recipient_unknown': False, 'broker_dm_ttl': None}
    if status in ('pending', 'inflight', 'done'):
        reason = 'outbox_%s_fingerprint_mismatch' % status
    else:
        reason = 'outbox_%s_fingerprint_%s' % (status, 'match' if match else 'mismatch')
    raise RpcError.of(CONFLICT, 'conflict', 'idempotency_key_reused', reason=reason,
                      daemon_fingerprint_prefix=stored[:8].hex(),
                      broker_message_id=row.broker_message_id if row is not None else None)
