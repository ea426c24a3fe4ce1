"""The Daemon: builds the daemon's parts, starts them in order, handles signals, stops.

`__init__` builds and starts nothing: the store, the event bus, the session registry, the
LinkTable, the inbound path, the drain, the sender and the RPC method table, each given
the narrow objects it uses (no part holds the Daemon). `start()` follows the start-up order
of spec/daemon.md §1.6; `run()` installs the signal handlers last and waits (huey's
consumer). Signal handlers only set flags: the main greenlet acts on them. Every greenlet
runs under one Supervisor (meshd/greenlets.py).
"""
import logging
import os
import signal
import sys
import uuid

import gevent
import gevent.event
from gevent import monkey
from rpc.admission import Limits
from rpc.methods import MethodTable
from rpc.protocol import INVALID_PARAMS, RpcError
from rpc.server import RpcServer
from storage import migrate
from storage.migrations import MIGRATIONS
from storage.models import Outbox, database
from storage.store import Store

from meshd import (__version__, api, clock, config as config_mod, container, files,
                   fingerprint, log as meshd_log, systemd, timings)
from meshd.agent_status import HookStatusReporter
from meshd.api.agent import AgentMethods
from meshd.api.daemon_methods import DaemonMethods
from meshd.api.events import EventMethods
from meshd.api.mailbox import MailboxMethods
from meshd.api.messages import MessageMethods
from meshd.api.moderation import ModerationMethods
from meshd.api.presence import PresenceMethods
from meshd.api.routing import Routes
from meshd.api.sessions import SessionMethods
from meshd.api.shared_data import SharedDataMethods
from meshd.broker_link import MemberLink, SessionLink
from meshd.bus import EventBus
from meshd.directory import Directory
from meshd.drain import Drain
from meshd.exceptions import ConfigError, DaemonExit, StorageError
from meshd.greenlets import Supervisor
from meshd.inbound import Inbound
from meshd.links import LinkTable
from meshd.pidfile import AlreadyRunning, PidLock
from meshd.presence_settings import PresenceSettings
from meshd.pruner import Pruner
from meshd.reaper import Reaper
from meshd.resolver import Resolver
from meshd.roster_watch import RosterPoll, RosterWatch
from meshd.send import Sender
from meshd.sessions import SessionRegistry
from meshd.surfacing import Surfacing

log = logging.getLogger(__name__)

LOG_ROTATE_CHECK = 60.0     # seconds between two looks at the detached log's size

DEFAULT_TIMINGS = {
    'reaper_interval': 5.0,
    'prune_interval': 3600.0,
    'events_keepalive': 15.0,
    'shutdown_grace': 5.0,
    'supervisor_backoff_max': 30.0,
    'drain_poll': 0.5,
    'drain_window': 16,
    'outbox_ttl': 7 * 24 * 3600.0,
    'link_hello_timeout': 5.0,
    'link_ping_interval': 30.0,
    'link_stale_after': 75.0,
    'link_ack_timeout': 15.0,
    'link_rpc_timeout': 5.0,
    'link_backoff_scale': 1.0,
    'clock_check_interval': 2.0,
    'roster_cache_ttl': 2.0,
    'drain_expire_interval': 1.0,
    'clock_jump_threshold': 10.0,
    'ipc_auth_timeout': 5.0,      # a TCP connection must `auth` within this
    'ipc_idle_timeout': 300.0,    # an unsubscribed connection idle this long is closed
    'channel_grace': 60.0,        # a channel emit waits this long for its confirmation
    'surface_check_interval': 30.0,
    'roster_poll_interval': 30.0,  # rosters read for peer_changed while events are watched
}


class Daemon:
    """One meshd daemon process."""

    def __init__(self, paths, options):
        self.paths = paths
        self.options = options
        self.timings = timings.load(DEFAULT_TIMINGS)
        self.lock = PidLock(paths.pid_file)
        self.supervisor = Supervisor(self.timings['supervisor_backoff_max'])
        self.store = Store(database)
        self.epoch = str(uuid.uuid4())
        self.bus = EventBus(self.store, self.epoch)
        self.sessions = SessionRegistry(self.store, paths)
        self.links = LinkTable(self.timings, self.supervisor, self._member_link,
                               self._session_link, self.sessions.all)
        self.directory = Directory(self.store)
        self.roster_watch = RosterWatch(self.bus.publish)
        self.presence_settings = PresenceSettings(self.store)
        self.inbound = Inbound(self.store, self.bus, self.links.is_own_pubkey, self.directory)
        self.drain = Drain(self.store, self.links, self.timings, self.supervisor)
        resolver = Resolver(self.links, self.directory, self.timings)
        self.sender = Sender(self.store, self.links, resolver, self.timings, self.drain.wake)
        routes = Routes(self.links, resolver.fallback_mesh, self.supervisor, self.timings)
        self.surfacing = Surfacing(self.store, self.sessions, self.bus.publish,
                                   self.links.member_pubkey, options.not_surfaced_after)
        self.methods = MethodTable()
        api.register(self.methods, [
            DaemonMethods(lambda: (self.epoch, self.schema_version), self.health,
                          self.reload_config, self.links),
            SessionMethods(self.sessions),
            MessageMethods(self.sender, self.links, self.directory, self.store),
            SharedDataMethods(routes),
            PresenceMethods(routes, self.presence_settings),
            ModerationMethods(routes, resolver, self.directory),
            MailboxMethods(self.store, self.links.member_pubkey, self.drain.wake),
            EventMethods(self.bus, self.timings['events_keepalive'], self.links.member_pubkey,
                         self.surfacing),
            AgentMethods(self.store, self.sessions, self.surfacing,
                         HookStatusReporter(self.supervisor, self._broker_url),
                         self.links.member_pubkey, lambda: self.timings['channel_grace']),
        ])
        self.server = None
        self.schema_version = None
        self._stop = gevent.event.Event()
        self._wake = gevent.event.Event()
        self._reload_requested = False
        self._stop_signal = None
        self._signal_handlers = []
        self._db_open = False

    def _member_link(self, mesh):
        link = MemberLink(mesh, self.timings, self.supervisor, self.inbound, self.bus.publish,
                          self.store, on_open=lambda: self._link_opened(link),
                          on_roster=self._roster_read)
        return link

    def _link_opened(self, link):
        self.presence_settings.replay(link)
        self.drain.wake()

    def _roster_read(self, slug, peers):
        self.directory.learn_roster(slug, peers)
        self.roster_watch.saw(slug, peers)

    def _broker_url(self, slug):
        mesh = self.links.meshes.get(slug)
        return mesh.get('brokerUrl') if mesh else None

    def _session_link(self, mesh, info):
        link = SessionLink(mesh, info, self.timings, self.supervisor, self.inbound,
                           on_open=lambda: self._link_opened(link))
        return link

    # -- start-up (spec/daemon.md §1.6) ------------------------------------------------

    def start(self):
        if not monkey.is_module_patched('socket'):
            raise RuntimeError('meshd requires gevent.monkey.patch_all() before other imports')
        files.ensure_private_dir(self.paths.home)
        files.ensure_private_dir(self.paths.daemon_dir)
        try:
            self.lock.acquire()
        except AlreadyRunning as exc:
            raise DaemonExit(1, str(exc))
        if self.lock.recovered_stale:
            print('recovered stale pid file; starting fresh', file=sys.stderr, flush=True)
        try:
            self._start_locked()
        except BaseException:
            self._abort_start()
            raise

    def _start_locked(self):
        self._check_host()
        token = files.ensure_local_token(self.paths.token)
        tcp_on = self.options.tcp == 'on' or (self.options.tcp == 'auto'
                                              and not container.in_container())
        if not tcp_on:
            log.info('tcp_listener_off', extra={'fields': {'reason': (
                'a container was detected; --tcp turns it on' if self.options.tcp == 'auto'
                else '--no-tcp or "tcp": "off" in config.json')}})
        self._open_database()
        self.supervisor.spawn('writer', self.store.run_writer)
        recovered = self.store.write(Outbox.recover_inflight, clock.now_ms())
        if recovered:
            log.info('outbox_inflight_recovered', extra={'fields': {'count': recovered}})
        self.bus.reset_log()
        self.directory.load()
        self.presence_settings.load()
        try:
            config = config_mod.load_config(self.paths.config)
        except ConfigError as exc:
            raise DaemonExit(2, 'config unreadable: %s: %s' % (self.paths.config, _detail(exc)))
        meshes = {mesh['slug']: mesh for mesh in config['meshes']}
        if not meshes:
            log.info('no_mesh_joined')
        for slug in sorted(meshes):
            self.links.attach(meshes[slug])
        self.supervisor.spawn('drain', self.drain.run)
        pruner = Pruner(self.store, self.bus)
        self.supervisor.every('prune', lambda: self.timings['prune_interval'], pruner.step)
        self.supervisor.spawn('clock', self.links.watch_clock)
        if os.environ.get('MESHD_DETACHED_LOG') == self.paths.log:
            rotation = meshd_log.LogRotation(self.paths.log)
            self.supervisor.every('log-rotate', LOG_ROTATE_CHECK, rotation.step)
        self.sessions.on_register.append(self._on_session_registered)
        self.sessions.on_deregister.append(self._on_session_deregistered)
        self.sessions.on_deregister.append(self.surfacing.forget)
        self.sessions.on_deregister.append(self.presence_settings.forget)
        poll = RosterPoll(lambda: self.bus.subscriber_count, self.links.rosters,
                          lambda: self.links.meshes)
        self.supervisor.every('roster-poll', lambda: self.timings['roster_poll_interval'],
                              poll.step, wait_first=True)
        self.supervisor.every('surfacing', lambda: self.timings['surface_check_interval'],
                              self.surfacing.check, wait_first=True)
        reaper = Reaper(self.sessions)
        self.supervisor.every('reaper', lambda: self.timings['reaper_interval'], reaper.step,
                              wait_first=True)
        self.sessions.rehydrate(self.links.meshes)
        self.server = RpcServer(
            self.methods, self.paths.socket, tcp_port=self.options.tcp_port if tcp_on else None,
            tcp_token=token, session_resolver=self.sessions.resolve,
            public_methods=('daemon.health',) if self.options.public_health else (),
            limits=Limits(auth_timeout=self.timings['ipc_auth_timeout'],
                          idle_timeout=self.timings['ipc_idle_timeout']))
        try:
            self.server.start()
        except OSError as exc:
            raise DaemonExit(1, 'ipc listen failed: %s' % exc)
        log.info('daemon_started', extra={'fields': {
            'version': __version__, 'pid': os.getpid(), 'sock': self.paths.socket,
            'tcp': self.server.tcp_address, 'meshes': sorted(self.links.meshes),
            'epoch': self.epoch, 'db': self.paths.database,
            'schema_version': self.schema_version}})
        systemd.notify('READY=1')

    def _check_host(self):
        identity = fingerprint.HostIdentity()
        outcome, stored = fingerprint.check(self.paths.fingerprint, identity)
        if outcome == fingerprint.FIRST_RUN:
            log.info('host_fingerprint_written', extra={'fields': {
                'fingerprint_prefix': identity.fingerprint[:16]}})
        elif outcome == fingerprint.MISMATCH:
            message = fingerprint.mismatch_message(stored, identity)
            if self.options.clone_policy == 'refuse':
                raise DaemonExit(4, message)
            if self.options.clone_policy == 'warn':
                print('WARN: %s (continuing per [clone] policy=warn)' % message,
                      file=sys.stderr, flush=True)

    def _open_database(self):
        path = self.paths.database
        try:
            self.store.open_sqlite(path, self.options.durability)
            self._db_open = True
            migrate.migrate(self.store, MIGRATIONS, incremental_vacuum=True)
            self.schema_version = migrate.schema_version(self.store)
        except StorageError as exc:
            raise DaemonExit(1, 'db open failed: %s: %s' % (path, exc))
        except Exception as exc:
            raise DaemonExit(1, 'db open failed: %s' % exc)

    def _abort_start(self):
        """Undo a start that failed half-way: stop greenlets, close the db, drop the lock."""
        self._stop.set()
        self.store.writer.stop(2)
        self.supervisor.kill(timeout=2)
        if self.server is not None:
            self.server.close_listeners()
        self._close_database()
        self.lock.release()

    # -- sessions ----------------------------------------------------------------------

    def _on_session_registered(self, info):
        log.info('session_registered', extra={'fields': {
            'sessionId': info.session_id, 'mesh': info.mesh, 'pid': info.pid,
            'presence': 'yes' if info.presence else 'no'}})
        self.links.open_session(info)
        self.drain.wake()
        self._publish_session_event('session_registered', info)

    def _on_session_deregistered(self, info):
        # Deregistered (by the session, launch, the bridge or the reaper): it ended on purpose.
        self.links.close_session(info.token, goodbye=True)
        self._publish_session_event('session_deregistered', info)

    def _publish_session_event(self, event, info):
        """A `system` event telling subscribers that a local session came or went."""
        self.bus.publish('system', {'event': event, 'mesh': info.mesh,
                                    'session_id': info.session_id,
                                    'display_name': info.display_name,
                                    'token_prefix': info.token_prefix})

    # -- config and health -------------------------------------------------------------

    def reload_config(self):
        """Attach meshes newly listed in config.json and detach those no longer listed."""
        try:
            config = config_mod.load_config(self.paths.config)
        except ConfigError as exc:
            message = 'config unreadable: %s: %s' % (self.paths.config, _detail(exc))
            log.warning('config_reload_failed', extra={'fields': {'err': message}})
            raise RpcError.of(INVALID_PARAMS, 'config_unreadable', message)
        attached, detached = self.links.replace_meshes(
            {mesh['slug']: mesh for mesh in config['meshes']})
        log.info('config_reloaded', extra={'fields': {'attached': attached,
                                                      'detached': detached}})
        return {'ok': True, 'attached': attached, 'detached': detached,
                'meshes': sorted(self.links.meshes)}

    def health(self):
        brokers, sessions = self.links.health()
        for info in self.sessions.all():
            if info.token_prefix in sessions:
                sessions[info.token_prefix]['mcp'] = self.surfacing.health(info.token)
        return {'ok': True, 'pid': os.getpid(), 'epoch': self.epoch,
                'tcp': self.server.tcp_address if self.server else None,
                'brokers': brokers, 'sessions': sessions}

    # -- running and stopping ----------------------------------------------------------

    def run(self):
        """Start, serve until SIGTERM/SIGINT, stop; return the exit status."""
        self.start()
        for signum, name in ((signal.SIGTERM, 'SIGTERM'), (signal.SIGINT, 'SIGINT')):
            self._signal_handlers.append(gevent.signal_handler(signum, self._handle_stop, name))
        self._signal_handlers.append(gevent.signal_handler(signal.SIGHUP, self._handle_hup))
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._reload_requested and not self._stop.is_set():
                self._reload_requested = False
                try:
                    self.reload_config()
                except RpcError:
                    pass  # logged as config_reload_failed; the running meshes stay
        self.stop(self._stop_signal)
        return 0

    def _handle_stop(self, name):
        # Only flags here: logging or joining from a signal handler is unsafe.
        if self._stop_signal is not None:
            os._exit(1)  # a second signal during shutdown exits at once (DESIGN.md 10)
        self._stop_signal = name
        self._stop.set()
        self._wake.set()

    def _handle_hup(self):
        self._reload_requested = True
        self._wake.set()

    def stop(self, reason=None):
        """Ordered, idempotent shutdown (DESIGN.md 10); each step isolated from the others."""
        self._stop.set()
        log.info('daemon_shutdown', extra={'fields': {'signal': reason}})
        systemd.notify('STOPPING=1')
        grace = self.timings['shutdown_grace']
        steps = (
            ('rpc listeners', lambda: self.server and self.server.stop(grace)),
            ('database writer', lambda: self.store.writer.stop(grace)),
            ('background tasks', lambda: self.supervisor.stop(grace)),
            ('member links', self.links.close_members),
            ('session links', self.links.close_sessions),
            ('database', self._close_database),
            ('lock', self.lock.release),
        )
        for name, step in steps:
            try:
                step()
            except Exception:
                log.exception('shutdown step failed: %s', name)
        for handler in self._signal_handlers:
            handler.cancel()
        self._signal_handlers = []

    def _close_database(self):
        if self._db_open:
            self.store.close()
            self._db_open = False


def _detail(exc):
    """A ConfigError's text without the 'Failed to load <path>: ' prefix."""
    text = str(exc)
    marker = ': '
    if text.startswith('Failed to load ') and marker in text[len('Failed to load '):]:
        return text.split(marker, 1)[1]
    return text
