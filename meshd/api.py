"""The daemon's local JSON-RPC methods (spec/daemon.md §8.2).

Each handler takes the call context first; `ctx.app` is the Daemon. Handlers validate what
the registry's type checks cannot express and raise RpcError with a stable `data.code`.
Results use snake_case; times in inbox and outbox items are ISO strings.
"""
import datetime
import logging
import re
import uuid

import gevent.queue
from rpc.protocol import (AUTH_ERROR, CONFLICT, INVALID_REQUEST, NOT_FOUND, UPSTREAM_ERROR,
                          RpcError, invalid_params, notification)
from rpc.connection import Stream
from storage import db as storage_db
from storage.models import OUTBOX_STATUSES, Idempotency, Inbox, Outbox

from meshd import clock, crypto, procs, send as send_mod
from meshd.clock import iso_from_ms
from meshd.sessions import SessionInfo

log = logging.getLogger(__name__)

STREAM_BACKLOG = 256  # events queued for a subscriber that stopped reading before its stream ends
IPC_FEATURES = ['version', 'health', 'send', 'inbox', 'events', 'peers', 'profile', 'skills',
                'state', 'memory', 'sessions']
_HEX64 = re.compile(r'^[0-9a-fA-F]{64}$')
_HEX128 = re.compile(r'^[0-9a-fA-F]{128}$')
KIB = 1024


def register(registry):
    """Add every local method to `registry`."""
    for name, fn, options in _METHODS:
        registry.method(name, **options)(fn)


# -- helpers ---------------------------------------------------------------------------

def _iso_to_ms(value, name):
    try:
        moment = datetime.datetime.fromisoformat(value.replace('Z', '+00:00'))
    except (AttributeError, ValueError):
        raise invalid_params('%r must be an ISO-8601 time' % name)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def _iso(ms):
    return None if ms is None else iso_from_ms(ms)


def _mesh_from_ctx(ctx, explicit):
    """The explicit non-blank mesh, else the attached session's mesh, else None."""
    if isinstance(explicit, str) and explicit.strip():
        return explicit.strip()
    session = ctx.session
    return session.mesh if session is not None else None


def _inbox_scope(ctx):
    """(session pubkey, member pubkey) for a session with presence, else None (spec §8.5)."""
    session = ctx.session
    if session is None or session.presence is None:
        return None
    return session.session_pubkey, ctx.app.member_pubkey(session.mesh)


def _clamp(value, default, low, high):
    if value is None:
        return default
    return max(low, min(high, value))


def _token(value, message):
    if not isinstance(value, str) or not _HEX64.match(value):
        raise invalid_params(message)
    return value.lower()


# -- connection and daemon -------------------------------------------------------------

def session_attach(ctx, token: str):
    """Bind this connection to a registered session; later calls act as that session."""
    token = _token(token, 'token must be 64 hex chars')
    info = ctx.app.registry.resolve(token)
    if info is None:
        raise RpcError.of(AUTH_ERROR, 'no_session', 'unknown session token')
    ctx.conn.session_token = token
    return {'ok': True, 'token_prefix': info.token_prefix, 'session_id': info.session_id,
            'mesh': info.mesh, 'presence': info.presence is not None}


def daemon_version(ctx):
    """The daemon's version, IPC API, schema version and instance epoch."""
    from meshd import __version__
    return {'daemon_version': __version__, 'ipc_api': 'v1', 'ipc_features': IPC_FEATURES,
            'schema_version': ctx.app.schema_version, 'epoch': ctx.app.epoch}


def daemon_health(ctx):
    """Liveness, pid, epoch, TCP address and the state of every broker and session link."""
    return ctx.app.health()


def daemon_reload(ctx):
    """Re-read config.json: attach meshes newly listed, detach meshes no longer listed."""
    return ctx.app.reload_config()


def meshes_list(ctx):
    """Every joined mesh (without secret keys) with its member link's status and state."""
    app = ctx.app
    meshes = []
    for slug in sorted(app.meshes):
        entry = app.meshes[slug]
        link = app.links.get(slug)
        meshes.append({'slug': slug, 'name': entry.get('name'), 'mesh_id': entry.get('meshId'),
                       'member_id': entry.get('memberId'), 'pubkey': entry.get('pubkey'),
                       'broker_url': entry.get('brokerUrl'), 'joined_at': entry.get('joinedAt'),
                       'display_name': entry.get('displayName'),
                       'status': link.status if link else 'closed',
                       'state': link.state if link else 'ok'})
    return {'meshes': meshes}


# -- messaging -------------------------------------------------------------------------

def send(ctx, to: str = None, message: str = None, mesh: str = None, priority: str = None,
         meta: dict = None, reply_to_id: str = None, client_message_id: str = None,
         ttl: int = None):
    """Queue a message durably (DM, @group or * broadcast); answers once it is in the outbox."""
    return send_mod.send(ctx, to, message, mesh=mesh, priority=priority, meta=meta,
                         reply_to_id=reply_to_id, client_message_id=client_message_id, ttl=ttl)


def peers_list(ctx, mesh: str = None):
    """The peers of one mesh (default: the session's) or of every joined mesh, concurrently."""
    app = ctx.app
    slug = _mesh_from_ctx(ctx, mesh)
    if slug is not None and slug not in app.meshes:
        raise RpcError.of(NOT_FOUND, 'mesh_not_attached', 'mesh not attached: %s' % slug,
                          mesh=slug)
    slugs = [slug] if slug is not None else sorted(app.meshes)
    rosters = send_mod.read_rosters(app, slugs)
    peers, unreachable = [], []
    for name in slugs:
        roster = rosters[name]
        if roster is None:
            unreachable.append(name)
            log.warning('ipc_peers_broker_failed', extra={'fields': {
                'mesh': name, 'err': 'broker unreachable'}})
            continue
        peers.extend(dict(peer, mesh=name) for peer in roster if isinstance(peer, dict))
    if slugs and len(unreachable) == len(slugs):
        raise RpcError.of(UPSTREAM_ERROR, 'broker_unreachable', 'no broker answered',
                          detail='unreachable: %s' % ', '.join(unreachable),
                          unreachable=unreachable)
    return {'peers': peers, 'unreachable': unreachable}


# -- sessions --------------------------------------------------------------------------

def _valid_presence(presence):
    """The presence with lowercased hex, or None when it is malformed."""
    if not isinstance(presence, dict):
        return None
    pub, sec = presence.get('session_pubkey'), presence.get('session_secret_key')
    attestation = presence.get('parent_attestation')
    if not (isinstance(pub, str) and _HEX64.match(pub) and isinstance(sec, str)
            and _HEX128.match(sec) and isinstance(attestation, dict)):
        return None
    att_pub = attestation.get('session_pubkey')
    parent = attestation.get('parent_member_pubkey')
    expires = attestation.get('expires_at')
    signature = attestation.get('signature')
    if not (isinstance(att_pub, str) and _HEX64.match(att_pub) and isinstance(parent, str)
            and _HEX64.match(parent) and isinstance(expires, (int, float))
            and not isinstance(expires, bool) and isinstance(signature, str)
            and _HEX128.match(signature)):
        return None
    try:
        if crypto.public_from_secret(sec.lower()) != pub.lower():
            return None  # the secret key must belong to the announced public key
    except ValueError:
        return None
    return {'session_pubkey': pub.lower(), 'session_secret_key': sec.lower(),
            'parent_attestation': {'session_pubkey': att_pub.lower(),
                                   'parent_member_pubkey': parent.lower(),
                                   'expires_at': int(expires), 'signature': signature.lower()}}


def sessions_register(ctx, token: str = None, session_id: str = None, mesh: str = None,
                      display_name: str = None, pid: int = None, cwd: str = None,
                      role: str = None, groups: list = None, presence: dict = None,
                      replace: bool = False):
    """Register an agent session (its token, mesh binding, pid and optional presence)."""
    token = _token(token, 'token must be 64 hex chars')
    if not (session_id and mesh and display_name and pid):
        raise invalid_params('session_id, mesh, display_name, pid all required')
    if not 0 < pid <= procs.MAX_PID:
        raise invalid_params("'pid' must be a process id (1 to %d)" % procs.MAX_PID)
    if groups is not None and not all(isinstance(g, str) for g in groups):
        raise invalid_params("'groups' must be an array of strings")
    accepted = None
    if presence is not None:
        accepted = _valid_presence(presence)
        if accepted is None:
            log.warning('session_register_presence_malformed', extra={'fields': {'mesh': mesh}})
    info = SessionInfo(token, session_id, mesh, display_name, pid, cwd=cwd, role=role,
                       groups=groups, presence=accepted)
    stored = ctx.app.register_session(info, replace=replace)
    return {'ok': True, 'registered_at': stored.registered_at,
            'presence_accepted': accepted is not None}


def sessions_deregister(ctx, token: str = None):
    """Deregister the session of `token`."""
    token = _token(token, 'invalid token')
    if not ctx.app.registry.deregister(token):
        raise RpcError.of(NOT_FOUND, 'session_not_found', 'session not found',
                          token_prefix=token[:8])
    return {'ok': True, 'token_prefix': token[:8]}


def sessions_me(ctx):
    """The attached session, without its secret key."""
    return {'session': ctx.session.public()}


def sessions_list(ctx):
    """Every registered session, without secret keys."""
    return {'sessions': [info.public() for info in ctx.app.registry.all()]}


# -- inbox -----------------------------------------------------------------------------

def _inbox_item(row):
    return {'id': row.id, 'client_message_id': row.client_message_id,
            'broker_message_id': row.broker_message_id, 'mesh': row.mesh, 'topic': row.topic,
            'sender_pubkey': row.sender_pubkey, 'sender_name': row.sender_name,
            'body': row.body, 'received_at': _iso(row.received_at),
            'reply_to_id': row.reply_to_id, 'seen_at': _iso(row.seen_at),
            'recipient_pubkey': row.recipient_pubkey, 'recipient_kind': row.recipient_kind,
            'decrypt_failed': bool(row.decrypt_failed), 'e2e': bool(row.e2e)}


def inbox_list(ctx, since: str = None, topic: str = None, sender: str = None,
               limit: int = None, mesh: str = None, unread_only: bool = False,
               mark_seen: bool = False):
    """List received messages visible to the caller, newest first."""
    query = Inbox.select().where(Inbox.in_scope(_inbox_scope(ctx)))
    if since is not None:
        query = query.where(Inbox.received_at >= _iso_to_ms(since, 'since'))
    if topic is not None:
        query = query.where(Inbox.topic == topic)
    if sender is not None:
        query = query.where(Inbox.sender_pubkey == sender)
    mesh = _mesh_from_ctx(ctx, mesh)
    if mesh is not None:
        query = query.where(Inbox.mesh == mesh)
    if unread_only:
        query = query.where(Inbox.seen_at.is_null())
    query = query.order_by(Inbox.received_at.desc(), Inbox.id).limit(_clamp(limit, 100, 1, 1000))
    with storage_db.reading():
        rows = list(query)
    items = [_inbox_item(row) for row in rows]
    marked = 0
    if mark_seen:
        unseen = [row.id for row in rows if row.seen_at is None]
        marked = _mark_seen(unseen)
    return {'items': items, 'marked_seen': marked}


def _mark_seen(ids):
    if not ids:
        return 0
    return storage_db.write(lambda: (Inbox.update(seen_at=clock.now_ms())
                                     .where(Inbox.id.in_(ids) & Inbox.seen_at.is_null())
                                     .execute()))


def inbox_mark_seen(ctx, ids: list = None):
    """Mark inbox rows seen; rows already seen keep their first timestamp."""
    if ids is None or not all(isinstance(i, str) for i in ids):
        raise invalid_params("missing 'ids' (string[])")
    scope = _inbox_scope(ctx)
    if scope is not None:
        with storage_db.reading():
            ids = [row.id for row in Inbox.select(Inbox.id)
                   .where(Inbox.id.in_(ids) & Inbox.in_scope(scope))]
    return {'marked_seen': _mark_seen(ids)}


def inbox_flush(ctx, mesh: str = None, before: str = None):
    """Delete the caller's inbox rows, optionally of one mesh and older than `before`."""
    condition = Inbox.in_scope(_inbox_scope(ctx))
    mesh = _mesh_from_ctx(ctx, mesh)
    if mesh is not None:
        condition &= Inbox.mesh == mesh
    if before is not None:
        condition &= Inbox.received_at < _iso_to_ms(before, 'before')
    removed = storage_db.write(lambda: Inbox.delete().where(condition).execute())
    return {'removed': removed}


def inbox_delete(ctx, id: str = None):  # noqa: A002 - the wire name is `id`
    """Delete one inbox row within the caller's scope."""
    if not id:
        raise invalid_params('missing id')
    scope = _inbox_scope(ctx)
    removed = storage_db.write(lambda: (Inbox.delete()
                                        .where((Inbox.id == id) & Inbox.in_scope(scope))
                                        .execute()))
    if not removed:
        raise RpcError.of(NOT_FOUND, 'not_found', 'inbox row not found', id=id)
    return {'removed': 1, 'id': id}


# -- outbox ----------------------------------------------------------------------------

def _outbox_item(row):
    return {'id': row.id, 'client_message_id': row.client_message_id, 'status': row.status,
            'attempts': row.attempts, 'enqueued_at': _iso(row.enqueued_at),
            'next_attempt_at': _iso(row.next_attempt_at),
            'delivered_at': _iso(row.delivered_at), 'broker_message_id': row.broker_message_id,
            'last_error': row.last_error, 'aborted_at': _iso(row.aborted_at),
            'aborted_by': row.aborted_by, 'superseded_by': row.superseded_by,
            'payload_bytes': len(row.payload or b''), 'mesh': row.mesh,
            'target_spec': row.target_spec, 'expires_at': _iso(row.expires_at)}


def outbox_list(ctx, status: str = None, limit: int = None):
    """List outbox rows newest first, optionally of one status."""
    if status not in OUTBOX_STATUSES:
        status = None  # an unknown status is ignored, as claudemesh does
    with storage_db.reading():
        rows = list(Outbox.newest(status, _clamp(limit, 50, 1, 500)))
    return {'items': [_outbox_item(row) for row in rows]}


def outbox_requeue(ctx, id: str = None, new_client_message_id: str = None,  # noqa: A002
                   aborted_by: str = 'operator'):
    """Abort a pending, inflight, dead or undelivered row; queue a copy under a new id."""
    if not id:
        raise invalid_params("missing 'id'")
    new_cmid = (new_client_message_id or '').strip() or str(uuid.uuid4())
    new_id = str(uuid.uuid4())
    now = clock.now_ms()
    def requeue():
        row = Outbox.get_or_none(Outbox.id == id)
        if row is None or row.status in ('aborted', 'done'):
            raise RpcError.of(CONFLICT, 'conflict', 'row not found, already aborted, or already done',
                              reason='requeue_not_allowed')
        if Idempotency.get_or_none(Idempotency.client_message_id == new_cmid) is not None:
            raise RpcError.of(CONFLICT, 'conflict', 'client_message_id already in use',
                              reason='client_message_id_in_use')
        (Outbox.update(status='aborted', aborted_at=now, aborted_by=aborted_by or 'operator',
                       superseded_by=new_id)
         .where((Outbox.id == id)
                & Outbox.status.in_(('pending', 'inflight', 'dead', 'undelivered')))
         .execute())
        Outbox.create(id=new_id, client_message_id=new_cmid,
                      request_fingerprint=row.request_fingerprint, payload=row.payload,
                      enqueued_at=now, attempts=0, next_attempt_at=now, status='pending',
                      mesh=row.mesh, target_spec=row.target_spec, nonce=row.nonce,
                      ciphertext=row.ciphertext, priority=row.priority,
                      sender_session_pubkey=row.sender_session_pubkey,
                      expires_at=now + (row.expires_at - row.enqueued_at))
        Idempotency.create(client_message_id=new_cmid,
                           request_fingerprint=row.request_fingerprint, outbox_id=new_id,
                           created_at=now)
    storage_db.write(requeue)
    ctx.app.wake_drain()
    return {'aborted_row_id': id, 'new_row_id': new_id, 'new_client_message_id': new_cmid}


# -- events ----------------------------------------------------------------------------

def event_filter(session, member_pubkey):
    """The per-session filter of spec/daemon.md §8.4; None session means no filter."""
    if session is None:
        return lambda event: True
    session_pubkey = (session.session_pubkey or '').lower() or None
    mesh_slug = session.mesh
    member = (member_pubkey or '').lower() or None

    def accept(event):
        data = event['data'] if isinstance(event.get('data'), dict) else {}
        if isinstance(data.get('mesh'), str) and data['mesh'] != mesh_slug:
            return False
        if event['kind'] != 'message':
            return True
        kind, recipient = data.get('recipient_kind'), data.get('recipient_pubkey')
        if not kind or not recipient:
            return True
        if kind == 'session':
            return session_pubkey is not None and recipient.lower() == session_pubkey
        if kind == 'member':
            return member is not None and recipient.lower() == member
        return True
    return accept


def events_subscribe(ctx, since_seq: int = None, epoch: str = None):
    """Stream events as notifications; resume after `since_seq` within the same epoch."""
    app = ctx.app
    if ctx.conn.stream is not None:
        raise RpcError.of(INVALID_REQUEST, 'invalid_request', 'already subscribed')
    if since_seq is not None and epoch is None:
        raise invalid_params('since_seq requires epoch')
    session = ctx.session
    accept = event_filter(session, app.member_pubkey(session.mesh) if session else None)
    queue = gevent.queue.Queue(maxsize=STREAM_BACKLOG)
    overflowed = []

    def on_event(event):
        if not accept(event):
            return
        try:
            queue.put_nowait(event)
        except gevent.queue.Full:
            # A subscriber that stopped reading must not hold every later event in memory:
            # its stream ends, and the client resumes (or resyncs) from its last seq.
            overflowed.append(True)
            unsubscribe()
    # Subscribe before reading the log, so nothing published meanwhile falls in a gap.
    unsubscribe = app.bus.subscribe(on_event)
    oldest, newest = app.bus.bounds()
    replay, resync = [], False
    if since_seq is not None:
        lost = oldest is not None and since_seq + 1 < oldest
        if epoch != app.epoch or lost:
            resync = True
        else:
            replay = [event for event in app.bus.replay(since_seq) if accept(event)]
    result = {'epoch': app.epoch, 'seq': newest, 'replayed': len(replay), 'resync': resync}

    def run(conn):
        try:
            # Live events at or below this bound were replayed (or predate the subscription).
            # Live events can be delivered out of seq order (each is handed over after its own
            # commit), so the bound stays fixed instead of following the last event sent.
            bound = replay[-1]['seq'] if replay else (newest if since_seq is None else since_seq)
            for event in replay:
                if not conn.send(notification('event', event)):
                    return
            keepalive = app.timings['events_keepalive']
            while not conn.closed.is_set() and not conn.stopping.is_set():
                if overflowed:
                    conn.close()
                    return
                try:
                    event = queue.get(timeout=keepalive)
                except gevent.queue.Empty:
                    params = {'epoch': app.epoch, 'seq': app.bus.bounds()[1]}
                    if not conn.send(notification('keepalive', params)):
                        return
                    continue
                if event['seq'] <= bound:
                    continue
                if not conn.send(notification('event', event)):
                    return
        finally:
            unsubscribe()
    return Stream(result, run, cancel=unsubscribe)


_METHODS = [
    ('session.attach', session_attach, {'result': '{ok, token_prefix, session_id, mesh, presence}'}),
    ('daemon.version', daemon_version,
     {'result': '{daemon_version, ipc_api, ipc_features, schema_version, epoch}'}),
    ('daemon.health', daemon_health,
     {'result': '{ok, pid, epoch, tcp, brokers:{slug:{status, state, detail, retry_at}}, '
                'sessions:{token_prefix:{status, state}}}'}),
    ('daemon.reload', daemon_reload, {'result': '{ok, attached, detached, meshes}'}),
    ('meshes.list', meshes_list, {'result': '{meshes:[{slug, name, mesh_id, member_id, pubkey, '
                                            'broker_url, joined_at, display_name, status, state}]}'}),
    ('send', send, {'session': 'optional', 'params_limit': 256 * KIB, 'pipelined': True,
                    'result': '{client_message_id, status, duplicate, broker_message_id, mesh, '
                              'target_spec, expires_at, recipient_name, recipient_online, '
                              'broker_dm_ttl}'}),
    ('peers.list', peers_list, {'session': 'optional', 'result': '{peers:[…], unreachable}'}),
    ('sessions.register', sessions_register,
     {'result': '{ok, registered_at, presence_accepted}'}),
    ('sessions.deregister', sessions_deregister, {'result': '{ok, token_prefix}'}),
    ('sessions.me', sessions_me, {'session': 'required', 'result': '{session}'}),
    ('sessions.list', sessions_list, {'result': '{sessions:[…]}'}),
    ('inbox.list', inbox_list, {'session': 'optional', 'renames': {'from': 'sender'},
                                'result': '{items:[…], marked_seen}'}),
    ('inbox.mark_seen', inbox_mark_seen, {'session': 'optional', 'result': '{marked_seen}'}),
    ('inbox.flush', inbox_flush, {'session': 'optional', 'result': '{removed}'}),
    ('inbox.delete', inbox_delete, {'session': 'optional', 'result': '{removed, id}'}),
    ('outbox.list', outbox_list, {'result': '{items:[…]}'}),
    ('outbox.requeue', outbox_requeue,
     {'params_limit': 4 * KIB, 'result': '{aborted_row_id, new_row_id, new_client_message_id}'}),
    ('events.subscribe', events_subscribe,
     {'session': 'optional', 'stream': True, 'result': '{epoch, seq, replayed, resync}'}),
]
