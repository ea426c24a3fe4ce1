"""BrokerServer: the `meshd broker` process (spec/wire.md §1, §3, §4.3, §4.5, §7.6, §11.4).

One gevent WSGIServer with a WebSocketHandler serves `/ws` and the HTTP routes on one port,
under the admission rules of meshd/broker/admission.py. Each connection's greenlet reads
and handles its frames one at a time and runs the close path in a `finally`, so no entry
stays online with a dead socket (D2). The server holds the process, the connections, the
periodic loops (keepalive, the 15 s sweeper, the TTL sweep, the rate-bucket sweep) and the
verb table; the jobs live in their own modules, each built here with what it uses:
handshake (checks and the reattach choice), lifecycle (presences), delivery (sends, drains,
acks), notices (undelivered DMs), peers, moderation, data, member verbs (own grants,
message status) and hooks (verbs), http (routes).
Every greenlet runs under one Supervisor. Built in __init__, started by start(), stopped by
stop(); run() adds the signal handlers (SIGTERM/SIGINT close every socket with 1001).
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
from meshd.broker import invite, protocol, store as broker_store
from meshd.broker.data import DataVerbs
from meshd.broker.delivery import AckPipeline, Delivery
from meshd.broker.handshake import Handshake
from meshd.broker.hooks import HookStatus
from meshd.broker.http import HttpRoutes
from meshd.broker.lifecycle import Lifecycle
from meshd.broker.member_verbs import MemberVerbs
from meshd.broker.message_queue import MessageQueue
from meshd.broker.models import Member, Mesh, Presence
from meshd.broker.moderation import ModerationVerbs
from meshd.broker.notices import UndeliveredNotices
from meshd.broker.peers import PeerVerbs
from meshd.broker.presence import ConnectionMap
from meshd.broker.ratelimit import RateLimiter, parse_spec
from meshd.broker.wsock import BrokerHandler, FrameTooLarge, StreamEnded
from meshd.exceptions import ConfigError
from meshd.greenlets import Supervisor

log = logging.getLogger(__name__)

DEFAULT_LISTEN = '127.0.0.1:7900'
DEFAULT_DM_TTL = 7 * 86400
DEFAULT_MAX_MESSAGE_BYTES = 65536
DEFAULT_MAX_FRAME_BYTES = 1048576
DEFAULT_MAX_CONNECTIONS_PER_MESH = 100
DEFAULT_MAX_CONNECTIONS = 1024
WS_PATH = '/ws'
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

    def __init__(self, ws, acks, hello_timeout):
        self.ws = ws
        self.entry = None
        self.proven = False     # said hello: no longer counted by admission
        self.hello_deadline = time.monotonic() + hello_timeout
        self.acks = acks


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
        self.timings = timings_mod.load(TIMING_DEFAULTS)
        for name, value in (timings or {}).items():
            if name not in TIMING_DEFAULTS:
                raise ConfigError('unknown broker timing: %s' % name)
            self.timings[name] = float(value)
        t = self.timings
        self.store = broker_store.new_store()
        self.supervisor = Supervisor()
        self.presences = ConnectionMap()
        self.admission = admission_mod.Admission(
            self.max_connections, per_address_limit, t['broker_hello_timeout'],
            t['broker_request_timeout'], trusted_proxies)
        self.limiter = RateLimiter(parse_spec(rate_limit))
        self.delivery = Delivery(self.presences, self.store, self.supervisor, self.limiter,
                                 self.max_message_bytes, self.dm_ttl, t['broker_lease'],
                                 t['broker_hook_fresh'], self._on_dead)
        self.notices = UndeliveredNotices(self.store, self.dm_ttl, self._on_dead)
        self.hooks = HookStatus(self.presences, self.store, self.delivery)
        self.lifecycle = Lifecycle(self.presences, self.store, self.delivery, self.notices,
                                   self.hooks, self.supervisor, self.timings)
        self.handshake = Handshake(self.presences, self.timings, self.max_connections_per_mesh)
        self.http = HttpRoutes(self.store, self.uptime, self.dm_ttl, self.max_message_bytes,
                               self.hooks.set_status, invite.join_safely)
        self.sockets = set()
        self.verbs = {'client_ack': self.delivery.client_ack,
                      'meshd_undelivered_ack': self.notices.ack,
                      'meshd_goodbye': self.lifecycle.goodbye}
        for group in (PeerVerbs(self.presences, self.store, self.delivery,
                                self.lifecycle.broadcast_event),
                      ModerationVerbs(self.presences, self.store, self.lifecycle.remove),
                      DataVerbs(self.store, self.presences),
                      MemberVerbs(self.store)):
            self.verbs.update(group.handlers())
        self._stop = gevent.event.Event()
        self._server = None
        self._writer = None
        self._store_open = False
        self._started_at = None
        self._signals = []
        self._stopped = False
        self._instance_lock = None

    def _on_dead(self, entry):
        self.lifecycle.on_dead(entry)

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
            self.supervisor.kill(timeout=STOP_TIMEOUT)
            if self._store_open:
                self.store.close()  # never another broker's (this one was refused by the lock)
        except Exception:
            log.exception('cleaning up a failed start failed')
        broker_store.release_instance_lock(self._instance_lock)
        self._instance_lock = None

    def _start(self):
        # The lock first: a second broker on the same database must touch nothing of it.
        self._instance_lock = broker_store.acquire_instance_lock(self.db_url)
        self._store_open = True
        broker_store.open_store(self.db_url, store=self.store)
        with self.store.connection():
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
        self._writer = self.supervisor.spawn('writer', self.store.run_writer)
        t, every, connection = self.timings, self.supervisor.every, self.store.connection
        every('keepalive', t['broker_ping'], self._keepalive_step, True, wrap=connection)
        every('sweeper', t['broker_sweep'], self._sweep_step, True, wrap=connection)
        every('ttl-sweep', t['broker_ttl_sweep'], self._ttl_step, True, wrap=connection)
        every('bucket-sweep', t['broker_bucket_sweep'], self.limiter.sweep, True)

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
        self.supervisor.stopping.set()  # no new grace timer, no new loop step
        for sig in self._signals:
            try:
                sig.cancel()
            except Exception:
                log.exception('cancelling a signal handler failed')
        steps = (('sockets', self._close_sockets),
                 ('listener', lambda: self._server and self._server.stop(timeout=STOP_TIMEOUT)),
                 ('greenlets', self._stop_greenlets),
                 ('presences', self._disconnect_all),
                 ('store', lambda: self._store_open and self.store.close()),
                 ('lock', lambda: broker_store.release_instance_lock(self._instance_lock)))
        for name, step in steps:
            try:
                step()
            except Exception:
                log.exception('stopping the broker failed at: %s', name)
        self._instance_lock = None
        log.info('meshd broker stopped')

    def _close_sockets(self):
        for ws in list(self.sockets):
            ws.close_with(protocol.CLOSE_GOING_AWAY, protocol.REASON_SHUTDOWN)

    def _stop_greenlets(self):
        # Sleeping grace timers are cancelled; loop steps, evictions, acks and drains already
        # running finish (a kill inside a query would leave its transaction half done), then
        # the writer commits what they queued before the store closes.
        for entry in self.presences.all():
            if entry.grace_timer is not None and not entry.evicting:
                entry.grace_timer.kill(block=False)
        self.supervisor.join_except(self._writer, timeout=STOP_TIMEOUT)
        self.store.writer.stop(STOP_TIMEOUT)
        self.supervisor.stop(STOP_TIMEOUT)

    def _disconnect_all(self):
        with self.store.connection():
            with self.store.writing():
                Presence.disconnect_all(clock.utcnow())

    def _startup_cleanup(self):
        # A previous process may have died without its shutdown path (§7.6).
        with self.store.writing():
            Presence.disconnect_all(clock.utcnow())
            MessageQueue.release_all_claims()

    # ------------------------------------------------------------------ connections

    def _application(self, environ, start_response):
        ws = environ.get('wsgi.websocket')
        if ws is None:
            return self.http(environ, start_response)
        self._serve(ws)
        return []

    def _serve(self, ws):
        ws.max_frame_bytes = self.max_frame_bytes
        ws.write_timeout = self.timings['broker_write_timeout']
        acks = AckPipeline(ws, self.store, self.delivery.spawn_worker)
        conn = _Conn(ws, acks, self.admission.hello_timeout)
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
                with self.store.connection():
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
                    with self.store.connection():
                        self.lifecycle.go_offline(conn.entry, ws)
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
            handler = self.verbs.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return      # unknown types are ignored silently (never unknown_message_type)
        try:
            handler(conn.entry, frame)
        except Exception:
            log.exception('handler for %s failed', kind)
            if kind == 'send':
                conn.entry.send(protocol.ack(frame.get('id'), err=protocol.ERR_INTERNAL))
            else:
                conn.entry.send(protocol.error('internal', 'internal error',
                                               req_id=protocol.req_id(frame)))

    def _hello(self, conn, frame, kind):
        rejection, admitted = self.handshake.admit(frame, kind)
        if rejection is not None:
            log.info('handshake rejected: %s', rejection.code)
            conn.ws.send_json(protocol.error(rejection.code, rejection.message))
            conn.ws.close_with(rejection.close_code, rejection.reason)
            return
        mesh, member, reattach = admitted
        self.lifecycle.bind(conn, frame, kind, mesh, member, reattach)

    # ------------------------------------------------------------------ loops

    def _keepalive_step(self):
        limit = self.timings['broker_pong_timeout']
        now = time.monotonic()
        for entry in self.presences.all():
            ws = entry.ws
            if ws is None:
                continue
            if not ws.is_open:
                self.lifecycle.go_offline(entry, ws)         # D2 safety net
            elif now - ws.last_pong_at > limit:
                log.info('presence %s silent for %.0fs: terminating', entry.presence_id,
                         now - ws.last_pong_at)
                ws.terminate()
                self.lifecycle.go_offline(entry, ws)
            else:
                ws.ping()

    def _sweep_step(self):
        now = clock.utcnow()
        t = self.timings
        self.delivery.release_orphans()
        self.delivery.mark_undelivered(now)
        entries = self.presences.all()
        revoked = Member.revoked_among({e.member_id for e in entries}) if entries else set()
        for entry in entries:
            if entry.member_id in revoked:
                self.lifecycle.remove(
                    entry, protocol.CLOSE_BANNED, protocol.REASON_BANNED,
                    protocol.error('revoked', 'You\'ve been removed from "%s". Contact the '
                                   'mesh owner to rejoin.' % Mesh.label(entry.mesh_id)))
        live = self.presences.live()
        with self.store.writing():
            if live:
                Presence.touch([e.presence_id for e in live], now)
            stale = now - datetime.timedelta(seconds=t['broker_stale_presence'])
            Presence.disconnect_stale([e.presence_id for e in self.presences.all()], stale, now)
        for entry in live:
            if (entry.status == 'working' and entry.status_updated_at is not None
                    and (now - entry.status_updated_at).total_seconds() > t['broker_status_ttl']):
                entry.status, entry.status_source = 'idle', 'jsonl'
        for entry in self.presences.live():
            self.delivery.drain(entry, unclaimed_only=True)
            self.notices.notify(entry)

    def _ttl_step(self):
        expired, delivered = self.delivery.expire()
        if expired or delivered:
            log.info('ttl sweep: %d expired, %d delivered rows pruned', expired, delivered)
