"""BrokerServer: the `meshd broker` process (spec/wire.md §1, §3, §4.3, §4.5, §7.6, §11.4).

One gevent WSGIServer with a WebSocketHandler serves `/ws` and the HTTP routes on one port. Each
connection's greenlet reads and handles its frames one at a time and runs the close path in a
`finally`, so no entry stays online with a dead socket (D2). The keepalive, the 15 s sweeper, the
TTL sweep and the rate-bucket sweep are supervised greenlets in one Group; grace timers are
greenlets of the same Group. Built in __init__, started by start(), stopped by stop(); run() adds
the signal handlers (SIGTERM/SIGINT close every socket with 1001 `shutting down`).
"""
import datetime
import functools
import logging
import re
import signal
import time

import gevent
import gevent.event
import gevent.pool
from gevent import monkey
from gevent.pywsgi import WSGIServer

from meshd import clock, systemd, timings as timings_mod
from meshd.broker import admission as admission_mod
from meshd.broker import delivery as delivery_mod
from meshd.broker import handshake, protocol, store
from meshd.broker.data import DataVerbs
from meshd.broker.http import HttpRoutes
from meshd.broker.presence import (OFFLINE, ROLE_MEMBER, ROLE_SESSION, Entry, Registry,
                                   extensions, normalise_groups)
from meshd.broker.ratelimit import RateLimiter, parse_spec
from meshd.broker.wsock import BrokerHandler, FrameTooLarge, StreamEnded
from meshd.exceptions import ConfigError

log = logging.getLogger(__name__)

DEFAULT_LISTEN = '127.0.0.1:7900'
DEFAULT_DM_TTL = 7 * 86400
DEFAULT_MAX_MESSAGE_BYTES = 65536
DEFAULT_MAX_FRAME_BYTES = 1048576
DEFAULT_MAX_CONNECTIONS_PER_MESH = 100
DEFAULT_MAX_CONNECTIONS = 1024
WS_PATH = '/ws'
EXT_VERSION = 1
# meshd extensions this broker speaks (docs/wire-extensions.md), announced in hello_ack.
BROKER_EXTENSIONS = (delivery_mod.EXT_UNDELIVERED,)
HOOK_RATE_LIMIT_PER_MIN = 30
PENDING_STATUS_SECONDS = 10
STOP_TIMEOUT = 3.0

# Seconds; MESHD_TEST_TIMINGS (tests only, DESIGN.md 20) or the `timings` argument shorten them.
TIMING_DEFAULTS = {
    'broker_ping': 30.0,            # keepalive ping cadence
    'broker_pong_timeout': 75.0,    # terminate when the last pong is older
    'broker_grace': 90.0,           # offline lease before eviction and peer_left
    'broker_lease': 30.0,           # DM claim lease
    'broker_sweep': 15.0,           # claim/re-drain/revocation sweeper
    'broker_ttl_sweep': 3600.0,     # expired and delivered queue rows pruned
    'broker_bucket_sweep': 300.0,   # idle rate buckets forgotten
    'broker_stale_presence': 90.0,  # DB presence rows without a ping are marked disconnected
    'broker_hello_skew': 60.0,      # hello timestamp window
    'broker_attest_max': 86400.0,   # longest attestation lifetime accepted
    'broker_write_timeout': 10.0,   # one frame write
    'broker_status_ttl': 60.0,      # stuck `working` swept back to idle
    'broker_hook_fresh': 30.0,      # a hook status younger than this holds
    'broker_hello_timeout': admission_mod.DEFAULT_HELLO_TIMEOUT,      # upgrade -> hello
    'broker_request_timeout': admission_mod.DEFAULT_REQUEST_TIMEOUT,  # accept -> request
}
_DURATION = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*([dhms]?)\s*$')
_UNITS = {'d': 86400, 'h': 3600, 'm': 60, 's': 1, '': 1}
_STATS_KEYS = ('messagesIn', 'messagesOut', 'toolCalls', 'errors')
MAX_STALE_MS = 10 * 365 * 86400 * 1000
_PROFILE_KEYS = ('avatar', 'title', 'bio', 'capabilities')


def parse_duration(value):
    """`7d`, `12h`, `30m`, `45s` or plain seconds → seconds (for --dm-ttl)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ConfigError('not a duration (use <n>d, <n>h, <n>m or seconds): %r' % value)
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_listen(value):
    """`HOST:PORT` (port 0 picks a free port) → (host, port)."""
    host, sep, port = str(value).rpartition(':')
    if not sep or not host:
        raise ConfigError('--listen must be HOST:PORT, not %r' % value)
    try:
        port = int(port)
    except ValueError:
        raise ConfigError('not a valid port: %r' % port)
    if not 0 <= port <= 65535:
        raise ConfigError('not a valid port: %r' % port)
    return host.strip('[]'), port


class HelloTimeout(Exception):
    """A WebSocket did not say hello within the deadline after its upgrade."""


class _Conn(object):
    """One WebSocket connection and the entry its hello bound (None before a successful hello)."""

    def __init__(self, ws, spawn, hello_timeout):
        self.ws = ws
        self.entry = None
        self.proven = False     # said hello: no longer counted by admission
        self.hello_deadline = time.monotonic() + hello_timeout
        self.acks = delivery_mod.AckPipeline(ws, spawn)


class BrokerServer(object):
    """The broker: build with the settings, then start() / stop(), or run() in the foreground."""

    def __init__(self, listen=DEFAULT_LISTEN, db=None, rate_limit='60:600', dm_ttl=DEFAULT_DM_TTL,
                 max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
                 max_connections_per_mesh=DEFAULT_MAX_CONNECTIONS_PER_MESH,
                 max_connections=DEFAULT_MAX_CONNECTIONS,
                 per_address_limit=admission_mod.DEFAULT_PER_ADDRESS, trusted_proxies=(),
                 timings=None):
        self.host, self.requested_port = parse_listen(listen)
        self.db_url = db
        self.dm_ttl = parse_duration(dm_ttl)
        self.max_message_bytes = int(max_message_bytes)
        self.max_frame_bytes = int(max_frame_bytes)
        self.max_connections_per_mesh = int(max_connections_per_mesh)
        self.max_connections = int(max_connections)
        self.t = timings_mod.load(TIMING_DEFAULTS)
        for name, value in (timings or {}).items():
            if name not in TIMING_DEFAULTS:
                raise ConfigError('unknown broker timing: %s' % name)
            self.t[name] = float(value)
        self.admission = admission_mod.Admission(
            self.max_connections, per_address_limit, self.t['broker_hello_timeout'],
            self.t['broker_request_timeout'], trusted_proxies)
        self.limiter = RateLimiter(parse_spec(rate_limit))
        self.hook_limiter = RateLimiter((HOOK_RATE_LIMIT_PER_MIN, HOOK_RATE_LIMIT_PER_MIN))
        self.registry = Registry()
        self.replay_cache = handshake.ReplayCache()
        self.delivery = delivery_mod.Delivery(
            self.registry, self.limiter, self.max_message_bytes, self.dm_ttl,
            self.t['broker_lease'], self.t['broker_hook_fresh'], self._on_dead)
        self.http = HttpRoutes(self)
        self.group = gevent.pool.Group()
        self.sockets = set()
        # Test seams: 'before_hello_ack' is called with the entry right before hello_ack;
        # 'before_bind' with the presence a hello is about to reattach.
        self.fault_hooks = {}
        # Test seam: the clock the hello skew and attestation checks read (ms since the epoch).
        self.clock_ms = clock.now_ms
        self._stop = gevent.event.Event()
        self._server = None
        self._writer = None
        self._started_at = None
        self._signals = []
        self._stopped = False
        self._instance_lock = None
        self._verbs = {
            'client_ack': self.delivery.client_ack,
            'meshd_undelivered_ack': self.delivery.undelivered_ack,
            'list_peers': self._verb_list_peers, 'set_status': self._verb_set_status,
            'set_summary': self._verb_set_summary, 'set_visible': self._verb_set_visible,
            'set_profile': self._verb_set_profile, 'set_stats': self._verb_set_stats,
            'join_group': self._verb_join_group, 'leave_group': self._verb_leave_group,
            'kick': self._verb_kick, 'disconnect': self._verb_disconnect, 'ban': self._verb_ban,
            'unban': self._verb_unban, 'list_bans': self._verb_list_bans,
        }
        self._verbs.update(DataVerbs(self.registry).handlers())

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self):
        """The bound port (valid after start(), also for port 0)."""
        return self._server.server_port if self._server is not None else None

    @property
    def url(self):
        """The WebSocket URL clients use."""
        return 'ws://%s:%d%s' % (self.host, self.port, WS_PATH)

    def uptime(self):
        return time.monotonic() - self._started_at if self._started_at else 0.0

    def start(self):
        """Open and migrate the store, clean up after a previous process, bind, start the loops."""
        try:
            self._start()
        except BaseException:
            self._abort_start()
            raise
        log.info('meshd broker listening on %s:%d (single node; dm ttl %ds)', self.host, self.port,
                 self.dm_ttl)
        return self

    def _abort_start(self):
        try:
            if self._server is not None:
                self._server.stop(timeout=0)
            store.close_store()
        except Exception:
            log.exception('cleaning up a failed start failed')
        store.release_instance_lock(self._instance_lock)
        self._instance_lock = None

    def _start(self):
        store.open_store(self.db_url)
        self._instance_lock = store.acquire_instance_lock(self.db_url)
        with store.connection():
            self._startup_cleanup()
        self._server = WSGIServer(
            (self.host, self.requested_port), self._application, handler_class=BrokerHandler,
            spawn=gevent.pool.Pool(self.admission.pool_size), log=None,
            error_log=logging.getLogger('meshd.broker.pywsgi'))
        # What BrokerHandler reads: the admission rules and the open WebSockets.
        self._server.admission = self.admission
        self._server.broker_sockets = self.sockets
        # Only /ws is upgraded; any other path goes to the plain application (404, not a reset).
        self._server.pre_start_hook = lambda handler: handler.environ.get('PATH_INFO') != WS_PATH
        self._server.start()
        self._started_at = time.monotonic()
        self._writer = gevent.spawn(self._run_writer)
        self._writer.name = 'writer'
        self._writer.link_exception(self._on_greenlet_crash)
        self._loop('keepalive', self._keepalive_step, 'broker_ping')
        self._loop('sweeper', self._sweep_step, 'broker_sweep')
        self._loop('ttl-sweep', self._ttl_step, 'broker_ttl_sweep')
        self._loop('bucket-sweep', self.limiter.sweep, 'broker_bucket_sweep')

    def run(self):
        """Foreground: start, wait for SIGTERM/SIGINT, stop. A second signal exits at once."""
        if not monkey.is_module_patched('socket'):
            raise RuntimeError('meshd broker requires gevent.monkey.patch_all() before other imports')
        self.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._signals.append(gevent.signal_handler(signum, self._handle_term))
        # The packaged unit is Type=notify: ready once the store is migrated and the port bound.
        systemd.notify('READY=1')
        try:
            self._stop.wait()
        finally:
            systemd.notify('STOPPING=1')
            self.stop()

    def _handle_term(self):
        # Signal handlers only set the event; the main greenlet shuts down.
        if self._stop.is_set():
            raise SystemExit(1)
        self._stop.set()

    def stop(self):
        """Close every socket with 1001, mark presences disconnected, stop loops and the store."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        for sig in self._signals:
            try:
                sig.cancel()
            except Exception:
                log.exception('cancelling a signal handler failed')
        for ws in list(self.sockets):
            try:
                ws.close_with(protocol.CLOSE_GOING_AWAY, protocol.REASON_SHUTDOWN)
            except Exception:
                log.exception('closing a socket at shutdown failed')
        try:
            if self._server is not None:
                self._server.stop(timeout=STOP_TIMEOUT)
        except Exception:
            log.exception('stopping the listener failed')
        try:
            # Sleeping grace timers are cancelled; loop steps and evictions already running
            # finish (a kill inside a query would leave its transaction half done).
            for entry in self.registry.all():
                if entry.grace_timer is not None and not entry.evicting:
                    entry.grace_timer.kill(block=False)
            self.group.join(timeout=STOP_TIMEOUT)
            self.group.kill(timeout=STOP_TIMEOUT)
        except Exception:
            log.exception('stopping the loops failed')
        try:
            self.delivery.workers.join(timeout=STOP_TIMEOUT)
            self.delivery.workers.kill(timeout=STOP_TIMEOUT)
        except Exception:
            log.exception('stopping the ack and drain greenlets failed')
        if self._writer is not None:
            # After the handlers and loops: what they queued is committed before the store closes.
            store.writer.stop(STOP_TIMEOUT)
            self._writer.join(STOP_TIMEOUT)
            self._writer = None
        try:
            with store.connection():
                with store.writing():
                    (store.Presence.update(disconnected_at=clock.utcnow())
                     .where(store.Presence.disconnected_at.is_null())
                     .execute())
        except Exception:
            log.exception('marking presences disconnected failed')
        try:
            store.close_store()
            store.release_instance_lock(self._instance_lock)
            self._instance_lock = None
        except Exception:
            log.exception('closing the store failed')
        log.info('meshd broker stopped')

    def _startup_cleanup(self):
        # A previous process may have died without its shutdown path (§7.6).
        now = clock.utcnow()
        with store.writing():
            (store.Presence.update(disconnected_at=now)
             .where(store.Presence.disconnected_at.is_null()).execute())
            (store.MessageQueue.update(claimed_at=None, claim_id=None, claim_expires_at=None)
             .where(store.MessageQueue.claim_id.is_null(False)).execute())

    @staticmethod
    def _run_writer():
        # A writer that crashed or stopped leaves writes running inline: nothing is lost.
        with store.connection():
            store.writer.run()

    def spawn(self, name, fn, *args):
        """Start a supervised greenlet in the broker's Group (crashes are logged)."""
        greenlet = self.group.spawn(fn, *args)
        greenlet.name = name
        greenlet.link_exception(self._on_greenlet_crash)
        return greenlet

    def spawn_later(self, seconds, name, fn, *args):
        greenlet = gevent.Greenlet(fn, *args)
        greenlet.name = name
        greenlet.link_exception(self._on_greenlet_crash)
        self.group.add(greenlet)
        greenlet.start_later(seconds)
        return greenlet

    def _on_greenlet_crash(self, greenlet):
        log.error('broker greenlet %s crashed', getattr(greenlet, 'name', greenlet),
                  exc_info=greenlet.exc_info)

    def _loop(self, name, step, interval_key):
        def loop():
            while not self._stop.wait(self.t[interval_key]):
                try:
                    with store.connection():
                        step()
                except Exception:
                    # One failed step must not end the loop; the next interval retries.
                    log.exception('%s step failed', name)
        return self.spawn(name, loop)

    # ------------------------------------------------------------------ connections

    def _application(self, environ, start_response):
        ws = environ.get('wsgi.websocket')
        if ws is None:
            return self.http(environ, start_response)
        self._serve(ws)
        return []

    def _serve(self, ws):
        ws.max_frame_bytes = self.max_frame_bytes
        ws.write_timeout = self.t['broker_write_timeout']
        conn = _Conn(ws, self.delivery.spawn_worker, self.admission.hello_timeout)
        self.sockets.add(ws)
        try:
            if self._stopped:
                ws.close_with(protocol.CLOSE_GOING_AWAY, protocol.REASON_SHUTDOWN)
                return
            while True:
                try:
                    data = self._next_message(conn)
                except HelloTimeout:
                    self.admission.hello_timed_out(ws.address)
                    ws.close_with(protocol.CLOSE_POLICY, 'hello timeout')
                    break
                except FrameTooLarge as exc:
                    log.info('frame of %d bytes above the hard limit: closing 1009', exc.args[0])
                    ws.close_with(protocol.CLOSE_TOO_BIG, protocol.REASON_TOO_BIG)
                    break
                except StreamEnded:
                    break
                with store.connection():
                    self._handle(conn, data)
                if conn.entry is not None and not conn.proven:
                    conn.proven = True
                    self.admission.proven(ws.address)
        finally:
            if not conn.proven:
                self.admission.proven(ws.address)
            self.sockets.discard(ws)
            ws.closed = True
            if conn.entry is not None:
                try:
                    with store.connection():
                        self._go_offline(conn.entry, ws)
                except Exception:
                    log.exception('close path failed')

    def _next_message(self, conn):
        """The next frame; before a hello, within the deadline counted from the upgrade."""
        if conn.entry is not None:
            return conn.ws.next_message()
        remaining = conn.hello_deadline - time.monotonic()
        if remaining <= 0:
            raise HelloTimeout()
        with gevent.Timeout(remaining, HelloTimeout):
            return conn.ws.next_message()

    def _handle(self, conn, data):
        ws = conn.ws
        if len(data) > self.max_message_bytes:
            try:
                frame = protocol.decode(data)
            except protocol.BadFrame:
                frame = None
            ws.send_json(self.delivery.oversize_answer(frame, len(data)))
            return
        try:
            frame = protocol.decode(data)
        except protocol.BadFrame:
            ws.send_json(protocol.error('invalid_json', 'frame is not a JSON object'))
            return
        kind = frame.get('type')
        if conn.entry is None:
            if kind in ('hello', 'session_hello'):
                try:
                    self._hello(conn, frame, kind)
                except Exception:
                    log.exception('%s failed', kind)
                    ws.send_json(protocol.error('internal', 'internal error'))
                    ws.close_with(protocol.CLOSE_INTERNAL, 'internal error')
            else:
                ws.send_json(protocol.error('no_hello', 'must send hello first'))
            return
        if kind == 'send':
            # Answered through the connection's ack pipeline once the row is committed.
            handler = functools.partial(self.delivery.handle_send, acks=conn.acks)
        else:
            handler = self._verbs.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return      # unknown types are ignored silently (never unknown_message_type)
        req_id = frame.get('_reqId') if isinstance(frame.get('_reqId'), str) else None
        try:
            handler(conn.entry, frame)
        except Exception:
            log.exception('handler for %s failed', kind)
            if kind == 'send':
                conn.entry.send(protocol.ack(frame.get('id'), err=protocol.ERR_INTERNAL))
            else:
                conn.entry.send(protocol.error('internal', 'internal error', req_id=req_id))

    # ------------------------------------------------------------------ handshake

    def _reject(self, ws, rejection):
        log.info('handshake rejected: %s', rejection.code)
        ws.send_json(protocol.error(rejection.code, rejection.message))
        ws.close_with(rejection.close_code, rejection.reason)

    def _hello_checks(self, frame, kind, now_ms):
        skew_ms = self.t['broker_hello_skew'] * 1000
        if kind == 'hello':
            pre = [lambda: handshake.check_session_pubkey(frame, required=False),
                   lambda: handshake.check_required(frame, kind)]
            post = [lambda: handshake.check_hello_signature(frame, kind, now_ms, skew_ms),
                    lambda: handshake.check_replay(frame, self.replay_cache, now_ms, skew_ms)]
        else:
            att_max_ms = self.t['broker_attest_max'] * 1000
            pre = [lambda: handshake.check_session_pubkey(frame, required=True),
                   lambda: handshake.check_parent_pubkey(frame),
                   lambda: handshake.check_attestation_binding(frame),
                   lambda: handshake.check_required(frame, kind)]
            post = [lambda: handshake.check_attestation(frame['parentAttestation'], now_ms, att_max_ms),
                    lambda: handshake.check_hello_signature(frame, kind, now_ms, skew_ms),
                    lambda: handshake.check_replay(frame, self.replay_cache, now_ms, skew_ms)]
        return pre, post

    def _find_reattach(self, frame, kind, member_pubkey):
        session_pubkey = frame.get('sessionPubkey') or None
        for entry in self.registry.in_mesh(frame['meshId']):
            if kind == 'session_hello':
                if entry.session_pubkey == session_pubkey:
                    return entry
            elif entry.lease == OFFLINE and entry.member_pubkey == member_pubkey:
                if session_pubkey and entry.session_pubkey == session_pubkey:
                    return entry
                if (not session_pubkey and not entry.session_pubkey
                        and entry.session_id == frame['sessionId']):
                    return entry
        return None

    def _hello(self, conn, frame, kind):
        ws = conn.ws
        now_ms = self.clock_ms()
        pre, post = self._hello_checks(frame, kind, now_ms)
        for check in pre:
            rejection = check()
            if rejection:
                return self._reject(ws, rejection)
        member_pubkey = frame.get('parentMemberPubkey') if kind == 'session_hello' else frame.get('pubkey')
        reattach = self._find_reattach(frame, kind, member_pubkey)
        takeovers = {e.presence_id for e in self.registry.in_mesh(frame['meshId'])
                     if e.session_id == frame['sessionId']}
        if reattach is not None:
            takeovers.add(reattach.presence_id)
        count = len([e for e in self.registry.in_mesh(frame['meshId'])
                     if e.presence_id not in takeovers])
        if count >= self.max_connections_per_mesh:
            return self._reject(ws, handshake.reject('capacity', 'mesh at connection capacity'))
        for check in post:
            rejection = check()
            if rejection:
                return self._reject(ws, rejection)
        mesh, member, rejection = handshake.lookup_member(frame['meshId'], member_pubkey, kind)
        if rejection:
            return self._reject(ws, rejection)
        if kind == 'session_hello':
            rejection = handshake.check_parent_member_id(frame, member)
            if rejection:
                return self._reject(ws, rejection)
        if reattach is not None and reattach.member_id != member.id:
            reattach = None     # a key claimed by another member never takes over an entry
        # The lookups above yielded: the entry may have been evicted or reattached meanwhile.
        if reattach is not None and (not self.registry.contains(reattach)
                                     or (kind == 'hello' and reattach.lease != OFFLINE)):
            reattach = None
        self._bind(conn, frame, kind, mesh, member, reattach)

    def _bind(self, conn, frame, kind, mesh, member, reattach):
        try:
            self._bind_and_ack(conn, frame, kind, mesh, member, reattach)
        except Exception:
            entry = conn.entry
            if entry is not None and not entry.ready:
                # Bound but never acked: unbind it, or it stays listed and unreachable.
                self._drop_unacked(conn, entry, is_new=entry is not reattach)
            raise

    def _bind_and_ack(self, conn, frame, kind, mesh, member, reattach):
        ws = conn.ws
        now = clock.utcnow()
        peer_state = None
        if kind == 'hello':
            peer_state = store.PeerState.get_or_none(
                (store.PeerState.mesh_id == mesh.id) & (store.PeerState.member_id == member.id))
        display_name = frame.get('displayName') if isinstance(frame.get('displayName'), str) and \
            frame.get('displayName') else None
        # sessionId de-dup: any other entry with this sessionId is replaced (no peer_left).
        for other in self.registry.in_mesh(mesh.id):
            if other is not reattach and other.session_id == frame['sessionId']:
                self._remove(other, protocol.CLOSE_NORMAL, protocol.REASON_REPLACED)
        hook = self.fault_hooks.get('before_bind')
        if hook is not None and reattach is not None:
            hook(reattach)
        # The reads above yield on PostgreSQL: the presence to reattach may have been evicted
        # meanwhile, and then this hello starts a new one.
        is_new = reattach is None or reattach.evicting or not self.registry.contains(reattach)
        if not is_new and reattach.grace_timer is not None:
            # Claimed before anything below yields, so its grace timer cannot evict it now.
            reattach.grace_timer.kill(block=False)
            reattach.grace_timer = None
        if is_new:
            entry = Entry(protocol.new_id(), mesh.id, member,
                          ROLE_SESSION if kind == 'session_hello' else ROLE_MEMBER,
                          frame['sessionId'], frame.get('sessionPubkey') or None,
                          display_name or member.display_name, frame)
            if 'groups' in frame and isinstance(frame.get('groups'), list):
                entry.groups = normalise_groups(frame['groups'])
            elif peer_state is not None:
                entry.groups = normalise_groups(store.loads(peer_state.groups, []))
            else:
                entry.groups = normalise_groups(store.loads(member.default_groups, []))
            if peer_state is not None:
                entry.visible = bool(peer_state.visible)
                entry.profile = store.loads(peer_state.profile, {}) or {}
            with store.writing():
                store.Presence.create(
                    id=entry.presence_id, member_id=member.id, mesh_id=mesh.id,
                    session_id=entry.session_id, session_pubkey=entry.session_pubkey,
                    display_name=entry.display_name, pid=frame['pid'], cwd=frame['cwd'],
                    status='idle', status_source='jsonl', status_updated_at=now, summary=None,
                    groups=store.dumps(entry.groups), role=entry.role, connected_at=now,
                    last_ping_at=now)
            self.registry.add(entry)
            # Bound at once: from here an exception still ends in this socket's close path.
            entry.attach(ws)
            conn.entry = entry
            self._apply_pending_status(entry, now)
        else:
            entry = reattach
            old_ws = entry.ws
            if old_ws is not None and old_ws is not ws and old_ws.is_open:
                old_ws.close_with(protocol.CLOSE_NORMAL, protocol.REASON_REPLACED)
            if old_ws is not None and old_ws is not ws:
                # The replaced socket's claims die with it (§7.10 rule 2).
                entry.detach()
                self.delivery.release(entry)
            entry.cwd = frame['cwd']
            entry.ext = extensions(frame)
            if display_name:
                entry.display_name = display_name
            entry.attach(ws)
            conn.entry = entry
            with store.writing():
                (store.Presence.update(disconnected_at=None, last_ping_at=now, cwd=frame['cwd'],
                                       display_name=entry.display_name)
                 .where(store.Presence.id == entry.presence_id).execute())
        hook = self.fault_hooks.get('before_hello_ack')
        if hook is not None:
            hook(entry)
        if not ws.is_open:
            # D2: the socket died during the hello; nothing may stay listed as online.
            self._drop_unacked(conn, entry, is_new)
            log.info('socket closed during %s; presence %s dropped', kind, entry.presence_id)
            return
        if entry.grace_timer is not None:
            entry.grace_timer.kill(block=False)
            entry.grace_timer = None
        entry.grace_token = None
        ws.send_json(self._hello_ack(frame, kind, mesh, member, entry, peer_state, is_new))
        # Only now may other greenlets push to it (events, drains): hello_ack comes first.
        entry.ready = True
        log.info('%s accepted: presence %s (%s)', kind, entry.presence_id,
                 'new' if is_new else 'reattached')
        if is_new:
            data = {'name': entry.display_name, 'pubkey': entry.pubkey, 'groups': entry.groups}
            if kind == 'hello' and peer_state is not None:
                data['lastSeenAt'] = protocol.iso(peer_state.last_seen_at)
                data['summary'] = peer_state.last_summary
                event = 'peer_returned'
            else:
                event = 'peer_joined'
            same_member_too = kind == 'session_hello'
            self._broadcast_event(entry, event, data, include_same_member=same_member_too)
        self.delivery.drain(entry)
        self.delivery.notify_undelivered(entry)

    def _drop_unacked(self, conn, entry, is_new):
        """Unbind an entry whose hello_ack was never written: a new one is removed, a
        reattached one (online before this hello) gets a fresh grace window."""
        conn.entry = None
        entry.detach()
        if is_new:
            self.registry.remove(entry)
            self._mark_disconnected(entry)
        elif entry.grace_timer is None or entry.grace_timer.dead:
            self._start_grace(entry)

    def _hello_ack(self, frame, kind, mesh, member, entry, peer_state, is_new):
        ack = {'type': 'hello_ack', 'presenceId': entry.presence_id,
               'memberDisplayName': entry.display_name}
        if kind == 'hello' or is_new:
            ack['memberProfile'] = {'roleTag': member.role_tag,
                                    'groups': store.loads(member.default_groups, []),
                                    'messageMode': member.message_mode or 'push'}
        ack['meshPolicy'] = {'selfEditable': store.loads(mesh.self_editable,
                                                         dict(protocol.DEFAULT_SELF_EDITABLE))}
        if kind == 'hello' and peer_state is not None:
            ack['restored'] = True
            ack['lastSummary'] = peer_state.last_summary
            ack['lastSeenAt'] = protocol.iso(peer_state.last_seen_at)
            if 'groups' not in frame:
                ack['restoredGroups'] = store.loads(peer_state.groups, [])
            stats = store.loads(peer_state.cumulative_stats, {})
            ack['restoredStats'] = {k: stats.get(k, 0) for k in _STATS_KEYS}
        if kind == 'hello':
            ack['services'] = []
        if isinstance(frame.get('meshdExt'), dict):
            # Only to a client that announced meshd extensions (a claudemesh one never sees it).
            ack['meshdExt'] = {'v': EXT_VERSION, 'features': list(BROKER_EXTENSIONS),
                               'dmTtlSeconds': int(self.dm_ttl)}
        return ack

    # ------------------------------------------------------------------ presence lifecycle

    def _broadcast_event(self, source, event, data, include_same_member=False):
        frame = protocol.system_push(event, data, source.mesh_id)
        for other in self.registry.live(source.mesh_id):
            if other is source:
                continue
            if not include_same_member and other.member_id == source.member_id:
                continue
            if not other.send(frame):
                self._on_dead(other)

    def _go_offline(self, entry, ws):
        """Close path: the entry's socket is gone; keep it offline-leased for the grace window."""
        if not self.registry.contains(entry) or entry.ws is not ws:
            return      # a newer socket took over, or the entry was removed already
        entry.detach()
        entry.offline_since = clock.utcnow()
        try:
            if entry.role == ROLE_MEMBER:
                self._save_peer_state(entry)
        except Exception:
            # A failed save must not skip the release and the grace window: the presence
            # would stay listed for good (review finding).
            log.exception('saving peer state of %s failed', entry.presence_id)
        self.delivery.release(entry)
        self._start_grace(entry)
        log.info('presence %s offline (grace %ss)', entry.presence_id, self.t['broker_grace'])

    def _start_grace(self, entry):
        token = object()
        entry.grace_token = token
        entry.offline_since = clock.utcnow()
        if not self._stopped:
            entry.grace_timer = self.spawn_later(self.t['broker_grace'], 'grace', self._evict,
                                                 entry, token)

    def _on_dead(self, entry):
        """A write to the entry's socket failed: terminate it and run the close path now."""
        ws = entry.ws
        if ws is not None:
            ws.terminate()
            self._go_offline(entry, ws)

    def _evict(self, entry, token):
        if (self._stopped or entry.lease != OFFLINE or entry.grace_token is not token
                or not self.registry.contains(entry)):
            return
        entry.evicting = True
        # Remove before any database call: a query yields (PostgreSQL), and a reattach in
        # that gap would bind a socket to an entry about to be evicted (review finding).
        self.registry.remove(entry)
        entry.grace_timer = None
        with store.connection():
            self._mark_disconnected(entry)
            log.info('presence %s evicted after grace', entry.presence_id)
            self._broadcast_event(entry, 'peer_left', {'name': entry.display_name,
                                                      'pubkey': entry.pubkey})

    def _remove(self, entry, code, reason, error_frame=None):
        """Remove an entry at once (kick, ban, disconnect, replacement, revocation)."""
        if not self.registry.remove(entry):
            return
        ws = entry.ws
        entry.detach()
        if entry.grace_timer is not None:
            entry.grace_timer.kill(block=False)
            entry.grace_timer = None
        if ws is not None:
            if error_frame is not None:
                ws.send_json(error_frame)
            ws.close_with(code, reason)
        self._mark_disconnected(entry)
        self.delivery.release(entry)
        log.info('presence %s removed (%d %s)', entry.presence_id, code, reason)

    def _mark_disconnected(self, entry):
        with store.writing():
            (store.Presence.update(disconnected_at=clock.utcnow())
             .where(store.Presence.id == entry.presence_id).execute())

    def _save_peer_state(self, entry):
        P = store.PeerState
        now = clock.utcnow()
        fields = dict(groups=store.dumps(entry.groups), profile=store.dumps(entry.profile),
                      visible=entry.visible, last_summary=entry.summary,
                      last_display_name=entry.display_name,
                      cumulative_stats=store.dumps(entry.stats or {}), last_seen_at=now)
        with store.writing():
            updated = (P.update(**fields)
                       .where((P.mesh_id == entry.mesh_id) & (P.member_id == entry.member_id))
                       .execute())
            if not updated:
                P.create(mesh_id=entry.mesh_id, member_id=entry.member_id, **fields)

    # ------------------------------------------------------------------ loops

    def _keepalive_step(self):
        limit = self.t['broker_pong_timeout']
        now = time.monotonic()
        for entry in self.registry.all():
            ws = entry.ws
            if ws is None:
                continue
            if not ws.is_open:
                self._go_offline(entry, ws)         # D2 safety net
            elif now - ws.last_pong_at > limit:
                log.info('presence %s silent for %.0fs: terminating', entry.presence_id,
                         now - ws.last_pong_at)
                ws.terminate()
                self._go_offline(entry, ws)
            else:
                ws.ping()

    def _sweep_step(self):
        now = clock.utcnow()
        self.delivery.release_orphans()
        self.delivery.mark_undelivered(now)
        entries = self.registry.all()
        member_ids = sorted({e.member_id for e in entries})
        if member_ids:
            revoked = {m.id for m in store.Member.select(store.Member.id)
                       .where(store.Member.id.in_(member_ids) & store.Member.revoked_at.is_null(False))}
            for entry in entries:
                if entry.member_id in revoked:
                    mesh = store.Mesh.get_or_none(store.Mesh.id == entry.mesh_id)
                    name = (mesh.name or mesh.slug) if mesh is not None else entry.mesh_id
                    self._remove(entry, protocol.CLOSE_BANNED, protocol.REASON_BANNED,
                                 protocol.error('revoked', 'You\'ve been removed from "%s". Contact '
                                                'the mesh owner to rejoin.' % name))
        live = self.registry.live()
        P = store.Presence
        with store.writing():
            if live:
                (P.update(last_ping_at=now)
                 .where(P.id.in_([e.presence_id for e in live])).execute())
            stale = now - datetime.timedelta(seconds=self.t['broker_stale_presence'])
            known = [e.presence_id for e in self.registry.all()]
            where = P.disconnected_at.is_null() & (P.last_ping_at < stale)
            if known:
                where &= P.id.not_in(known)
            P.update(disconnected_at=now).where(where).execute()
        for entry in live:
            if (entry.status == 'working' and entry.status_updated_at is not None
                    and (now - entry.status_updated_at).total_seconds() > self.t['broker_status_ttl']):
                entry.status, entry.status_source = 'idle', 'jsonl'
        for entry in self.registry.live():
            self.delivery.drain(entry, unclaimed_only=True)
            self.delivery.notify_undelivered(entry)

    def _ttl_step(self):
        expired, delivered = self.delivery.expire()
        if expired or delivered:
            log.info('ttl sweep: %d expired, %d delivered rows pruned', expired, delivered)

    # ------------------------------------------------------------------ verbs

    @staticmethod
    def _req(frame):
        req_id = frame.get('_reqId')
        return req_id if isinstance(req_id, str) else None

    def _verb_list_peers(self, entry, frame):
        P, M = store.Presence, store.Member
        rows = (P.select(P, M.peer_pubkey, M.display_name.alias('member_name'))
                .join(M, on=(P.member_id == M.id))
                .where((M.mesh_id == entry.mesh_id) & P.disconnected_at.is_null())
                .order_by(P.connected_at, P.id)
                .objects())
        peers = []
        for row in rows:
            live = self.registry.entries.get(row.id)
            if live is not None and not live.visible and live.member_id != entry.member_id:
                continue
            peer = {
                'pubkey': row.session_pubkey or row.peer_pubkey,
                'memberPubkey': row.peer_pubkey,
                'displayName': row.display_name or row.member_name,
                'status': live.status if live is not None else row.status,
                'summary': live.summary if live is not None else row.summary,
                'groups': live.groups if live is not None else store.loads(row.groups, []),
                'sessionId': row.session_id,
                'connectedAt': protocol.iso(row.connected_at),
                'cwd': live.cwd if live is not None else row.cwd,
                'peerRole': row.role,
            }
            if live is not None:
                for key, value in (('hostname', live.hostname), ('peerType', live.peer_type),
                                   ('channel', live.channel), ('model', live.model),
                                   ('stats', live.stats)):
                    if value is not None:
                        peer[key] = value
                peer['visible'] = live.visible
                if live.profile:
                    peer['profile'] = live.profile
            peers.append(peer)
        reply = {'type': 'peers_list', 'peers': peers}
        if self._req(frame) is not None:
            reply['_reqId'] = self._req(frame)
        entry.send(reply)

    def _update_presence(self, entry, **fields):
        with store.writing():
            store.Presence.update(**fields).where(store.Presence.id == entry.presence_id).execute()

    def _verb_set_status(self, entry, frame):
        status = frame.get('status')
        if status not in protocol.STATUSES:
            return
        now = clock.utcnow()
        entry.status, entry.status_source, entry.status_updated_at = status, 'manual', now
        self._update_presence(entry, status=status, status_source='manual', status_updated_at=now)
        self.delivery.drain(entry)

    def _verb_set_summary(self, entry, frame):
        summary = frame.get('summary')
        if isinstance(summary, str):
            entry.summary = summary
            self._update_presence(entry, summary=summary)

    def _small_ack(self, entry, frame):
        req_id = self._req(frame)
        entry.send(protocol.ack(req_id or '', '', False, req_id=req_id))

    def _verb_set_visible(self, entry, frame):
        visible = frame.get('visible')
        if isinstance(visible, bool):
            entry.visible = visible
            self._broadcast_event(entry, 'peer_visible' if visible else 'peer_hidden',
                                  {'name': entry.display_name, 'pubkey': entry.pubkey},
                                  include_same_member=True)
        self._small_ack(entry, frame)

    def _verb_set_profile(self, entry, frame):
        for key in _PROFILE_KEYS:
            if key in frame:
                entry.profile[key] = frame[key]
        self._small_ack(entry, frame)

    def _verb_set_stats(self, entry, frame):
        if isinstance(frame.get('stats'), dict):
            entry.stats = frame['stats']

    def _verb_join_group(self, entry, frame):
        name, role = frame.get('name'), frame.get('role')
        # The limits of a hello's groups: every ancestor of a/b/c is a target, so a name of
        # thousands of levels cost seconds and hundreds of MB at every drain and fan-out.
        if not isinstance(name, str) or not 0 < len(name) <= handshake.MAX_NAME:
            return
        if (len(entry.groups) >= handshake.MAX_GROUPS
                and all(g['name'] != name for g in entry.groups)):
            return
        group = {'name': name}
        if isinstance(role, str) and len(role) <= handshake.MAX_NAME:
            group['role'] = role
        entry.groups = [g for g in entry.groups if g['name'] != name] + [group]
        self._update_presence(entry, groups=store.dumps(entry.groups))
        self.delivery.drain(entry)

    def _verb_leave_group(self, entry, frame):
        name = frame.get('name')
        entry.groups = [g for g in entry.groups if g['name'] != name]
        self._update_presence(entry, groups=store.dumps(entry.groups))

    # ------------------------------------------------------------------ hook statuses

    def hook_status(self, body):
        """`POST /hook/set-status` (§9.4, §7.5): set a presence's status from a Claude Code hook."""
        if not isinstance(body, dict) or not body.get('cwd') or not body.get('status'):
            return 200, {'ok': False, 'error': 'cwd and status required'}
        cwd, status, pid = body['cwd'], body['status'], body.get('pid')
        if status not in protocol.STATUSES or not isinstance(cwd, str):
            return 200, {'ok': False, 'error': 'invalid status'}
        pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
        if not self.hook_limiter.take('%s:%s' % (pid, cwd)):
            return 429, {'ok': False, 'error': 'rate limited'}
        now = clock.utcnow()
        candidates = [e for e in self.registry.all() if e.cwd == cwd]
        entry = next((e for e in candidates if pid is not None and e.pid == pid), None)
        if entry is None and candidates:
            entry = max(candidates, key=lambda e: e.generation)
        if entry is None:
            with store.writing():
                store.PendingStatus.create(pid=pid, cwd=cwd, status=status, created_at=now)
            return 200, {'ok': True, 'pending': True}
        if entry.status == 'dnd':
            return 200, {'ok': True, 'presence_id': entry.presence_id}     # hooks cannot clear dnd
        entry.status, entry.status_source, entry.status_updated_at = status, 'hook', now
        self._update_presence(entry, status=status, status_source='hook', status_updated_at=now)
        self.delivery.drain(entry)
        return 200, {'ok': True, 'presence_id': entry.presence_id}

    def _apply_pending_status(self, entry, now):
        P = store.PendingStatus
        cutoff = now - datetime.timedelta(seconds=PENDING_STATUS_SECONDS)
        row = (P.select()
               .where((P.cwd == entry.cwd) & ((P.pid == entry.pid) | P.pid.is_null())
                      & P.applied_at.is_null() & (P.created_at > cutoff))
               .order_by(P.created_at.desc())
               .first())
        if row is None:
            return
        entry.status, entry.status_source, entry.status_updated_at = row.status, 'hook', row.created_at
        with store.writing():
            P.update(applied_at=now).where(P.id == row.id).execute()
            (store.Presence.update(status=row.status, status_source='hook',
                                   status_updated_at=row.created_at)
             .where(store.Presence.id == entry.presence_id).execute())

    # ------------------------------------------------------------------ admin verbs

    def _is_admin(self, entry):
        member = store.Member.get_or_none(store.Member.id == entry.member_id)
        return member is not None and member.role == 'admin' and member.revoked_at is None

    def _select_targets(self, entry, frame):
        entries = self.registry.in_mesh(entry.mesh_id)
        if frame.get('all'):
            return [e for e in entries if e is not entry], ''
        stale = frame.get('stale')
        if protocol.is_finite_number(stale) and stale > 0:
            # Beyond ten years nothing is that stale; a larger number overflows a timedelta.
            cutoff = clock.utcnow() - datetime.timedelta(milliseconds=min(stale, MAX_STALE_MS))
            rows = {p.id for p in store.Presence.select(store.Presence.id)
                    .where(store.Presence.id.in_([e.presence_id for e in entries] or [''])
                           & (store.Presence.last_ping_at < cutoff))}
            return [e for e in entries if e.presence_id in rows], '_stale'
        target = frame.get('target')
        if isinstance(target, str) and target:
            return [e for e in entries if e.display_name == target
                    or e.member_pubkey == target or e.member_pubkey.startswith(target)], ''
        return [], ''

    def _kick_or_disconnect(self, entry, frame, verb):
        req_id = self._req(frame)
        if not self._is_admin(entry):
            entry.send(protocol.error('forbidden', 'only owner or admin can %s' % verb, req_id=req_id))
            return
        targets, suffix = self._select_targets(entry, frame)
        affected, skipped = [], []
        for target in targets:
            name = target.display_name or target.presence_id
            if verb == 'kick' and target.role == ROLE_MEMBER:
                skipped.append(name)
                continue
            if verb == 'kick':
                self._remove(target, protocol.CLOSE_KICKED, 'kicked' + suffix)
            else:
                self._remove(target, protocol.CLOSE_NORMAL, 'disconnected' + suffix)
            affected.append(name)
        reply = {'type': verb + '_ack', 'kicked': affected, 'affected': affected}
        if verb == 'kick':
            reply['skipped_control_plane'] = skipped
        if req_id is not None:
            reply['_reqId'] = req_id
        entry.send(reply)

    def _verb_kick(self, entry, frame):
        self._kick_or_disconnect(entry, frame, 'kick')

    def _verb_disconnect(self, entry, frame):
        self._kick_or_disconnect(entry, frame, 'disconnect')

    def _verb_ban(self, entry, frame):
        req_id = self._req(frame)
        target = frame.get('target')
        if not isinstance(target, str) or not target:
            return entry.send(protocol.error('invalid', 'target required', req_id=req_id))
        if not self._is_admin(entry):
            return entry.send(protocol.error('forbidden', 'only owner or admin can ban', req_id=req_id))
        M = store.Member
        members = list(M.select().where((M.mesh_id == entry.mesh_id) & M.revoked_at.is_null())
                       .order_by(M.joined_at, M.id))
        found = ([m for m in members if m.display_name == target or m.peer_pubkey == target]
                 or [m for m in members if m.peer_pubkey.startswith(target)])
        if not found:
            return entry.send(protocol.error('not_found', 'peer "%s" not found' % target, req_id=req_id))
        member = found[0]
        if member.id == entry.member_id:
            return entry.send(protocol.error('invalid', 'cannot ban yourself', req_id=req_id))
        with store.writing():
            M.update(revoked_at=clock.utcnow()).where(M.id == member.id).execute()
        for other in self.registry.in_mesh(entry.mesh_id):
            if other.member_id == member.id:
                self._remove(other, protocol.CLOSE_BANNED, protocol.REASON_BANNED)
        reply = {'type': 'ban_ack', 'banned': member.display_name}
        if req_id is not None:
            reply['_reqId'] = req_id
        entry.send(reply)

    def _verb_unban(self, entry, frame):
        req_id = self._req(frame)
        target = frame.get('target')
        if not isinstance(target, str) or not target:
            return entry.send(protocol.error('invalid', 'target required', req_id=req_id))
        if not self._is_admin(entry):
            return entry.send(protocol.error('forbidden', 'only owner or admin can unban', req_id=req_id))
        M = store.Member
        member = (M.select().where((M.mesh_id == entry.mesh_id) & M.revoked_at.is_null(False)
                                   & ((M.display_name == target) | (M.peer_pubkey == target)))
                  .first())
        if member is None:
            return entry.send(protocol.error('not_found', 'no banned peer "%s"' % target, req_id=req_id))
        with store.writing():
            M.update(revoked_at=None).where(M.id == member.id).execute()
        reply = {'type': 'unban_ack', 'unbanned': member.display_name}
        if req_id is not None:
            reply['_reqId'] = req_id
        entry.send(reply)

    def _verb_list_bans(self, entry, frame):
        M = store.Member
        bans = [{'name': m.display_name, 'pubkey': m.peer_pubkey, 'revokedAt': protocol.iso(m.revoked_at)}
                for m in M.select().where((M.mesh_id == entry.mesh_id) & M.revoked_at.is_null(False))
                .order_by(M.revoked_at)]
        reply = {'type': 'list_bans_result', 'bans': bans}
        if self._req(frame) is not None:
            reply['_reqId'] = self._req(frame)
        entry.send(reply)
