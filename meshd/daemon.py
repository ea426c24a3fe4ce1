"""The Daemon: the one place that wires storage, rpc, the registry, bus, reaper and pruner.

`__init__` builds and starts nothing; `start()` follows the start-up order of
spec/daemon.md §1.6; `run()` installs the signal handlers last and waits (huey's consumer).
Signal handlers only set flags: the main greenlet acts on them. Every long-lived greenlet
is started through `spawn()`, which supervises it.
"""
import logging
import os
import signal
import sys
import time
import uuid

import gevent
import gevent.event
import gevent.pool
from gevent import monkey
from rpc.protocol import CONFLICT, INVALID_PARAMS, RpcError
from rpc.registry import Registry
from rpc.admission import Limits
from rpc.server import RpcServer
from storage import db as storage_db
from storage import migrations
from storage.models import Outbox

from meshd import (__version__, api, clock, config as config_mod, container, crypto, files,
                   fingerprint, keystore, procs, systemd, timings)
from meshd.bus import EventBus
from meshd.drain import Drain
from meshd.links import MemberLink, SessionLink
from meshd.exceptions import ConfigError
from meshd.pidfile import AlreadyRunning, PidLock
from meshd.pruner import Pruner
from meshd.reaper import Reaper
from meshd.sessions import SessionRegistry

log = logging.getLogger(__name__)

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
}
ATTESTATION_TTL_MS = 12 * 3600 * 1000


class DaemonExit(Exception):
    """Start-up cannot go on: print `message` (if any) on stderr and exit with `code`."""

    def __init__(self, code, message=None):
        super().__init__(message or '')
        self.code = code
        self.message = message


class Daemon:
    """One meshd daemon process."""

    def __init__(self, paths, options):
        self.paths = paths
        self.options = options
        self.timings = timings.load(DEFAULT_TIMINGS)
        self.lock = PidLock(paths.pid_file)
        self.registry = SessionRegistry()
        self.rpc_registry = Registry()
        api.register(self.rpc_registry)
        self.group = gevent.pool.Group()
        self.epoch = None
        self.bus = None
        self.server = None
        self.schema_version = None
        self.config = config_mod.empty_config()
        self.meshes = {}           # slug -> config.json entry
        self.links = {}            # slug -> member link (broker links arrive with the links issue)
        self.session_links = {}    # token -> session link
        self.drain_wakeup = gevent.event.Event()
        self.drain = None
        self._stop = gevent.event.Event()
        self._wake = gevent.event.Event()
        self._reload_requested = False
        self._stop_signal = None
        self._signal_handlers = []
        self._db_open = False
        self._restarts = {}

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
        self._open_database()
        self.spawn('writer', storage_db.writer.run)
        recovered = Outbox.recover_inflight(clock.now_ms())
        if recovered:
            log.info('outbox_inflight_recovered', extra={'fields': {'count': recovered}})
        self.epoch = str(uuid.uuid4())
        self.bus = EventBus(self.epoch)
        self.bus.reset_log()
        try:
            self.config = config_mod.load_config(self.paths.config)
        except ConfigError as exc:
            raise DaemonExit(2, 'config unreadable: %s: %s' % (self.paths.config, _detail(exc)))
        self.meshes = {mesh['slug']: mesh for mesh in self.config['meshes']}
        if not self.meshes:
            log.info('no_mesh_joined')
        for slug in sorted(self.meshes):
            self._attach_mesh(slug)
        self.drain = Drain(self)
        self.spawn('drain', self.drain.run, self._stop)
        pruner = Pruner(self.bus)
        self.spawn('pruner', self._every, 'prune_interval', pruner.step)
        self.spawn('clock', self._watch_clock)
        self.registry.on_register.append(self._on_session_registered)
        self.registry.on_deregister.append(self._on_session_deregistered)
        reaper = Reaper(self.registry)
        self.spawn('reaper', self._every, 'reaper_interval', reaper.step, True)
        self._rehydrate_sessions()
        self.registry.persist_enabled = True
        self.server = RpcServer(self.rpc_registry, self.paths.socket,
                                tcp_port=self.options.tcp_port if tcp_on else None,
                                tcp_token=token, session_resolver=self.registry.resolve,
                                app=self, public_methods=('daemon.health',)
                                if self.options.public_health else (),
                                limits=Limits(auth_timeout=self.timings['ipc_auth_timeout'],
                                              idle_timeout=self.timings['ipc_idle_timeout']))
        try:
            self.server.start()
        except OSError as exc:
            raise DaemonExit(1, 'ipc listen failed: %s' % exc)
        log.info('daemon_started', extra={'fields': {
            'version': __version__, 'pid': os.getpid(), 'sock': self.paths.socket,
            'tcp': self.server.tcp_address, 'meshes': sorted(self.meshes), 'epoch': self.epoch,
            'db': self.paths.database, 'schema_version': self.schema_version}})
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
            storage_db.open_database(path, self.options.durability)
            self._db_open = True
            migrations.migrate(storage_db.db, path)
            self.schema_version = migrations.schema_version(storage_db.db)
        except migrations.SchemaTooNewError as exc:
            raise DaemonExit(1, 'db open failed: %s: %s' % (path, exc))
        except Exception as exc:
            raise DaemonExit(1, 'db open failed: %s' % exc)

    def _abort_start(self):
        """Undo a start that failed half-way: stop greenlets, close the db, drop the lock."""
        self._stop.set()
        storage_db.writer.stop(2)
        self.group.kill(timeout=2)
        if self.server is not None:
            self.server.close_listeners()
        if self._db_open:
            storage_db.close_database()
        self.lock.release()

    # -- supervision -------------------------------------------------------------------

    def spawn(self, name, fn, *args):
        """Start a supervised greenlet: a crash is logged and the task restarted with backoff."""
        greenlet = self.group.spawn(fn, *args)
        greenlet.name = name
        greenlet.link_exception(lambda g: self._on_crash(name, fn, args, g))
        return greenlet

    def _on_crash(self, name, fn, args, greenlet):
        log.error('greenlet_crashed', exc_info=greenlet.exc_info,
                  extra={'fields': {'greenlet': name}})
        if self._stop.is_set():
            return
        count = self._restarts[name] = self._restarts.get(name, 0) + 1
        delay = min(self.timings['supervisor_backoff_max'], 2 ** min(count, 5) / 2.0)

        def restart():
            if not self._stop.wait(delay):
                self.spawn(name, fn, *args)
        self.group.spawn(restart)

    def _every(self, interval_key, step, wait_first=False):
        """Run `step()` every `interval_key` seconds until stop; a failing step is logged."""
        if wait_first and self._stop.wait(self.timings[interval_key]):
            return
        while not self._stop.is_set():
            try:
                step()
            except Exception:
                log.exception('%s step failed', interval_key.replace('_interval', ''))
            if self._stop.wait(self.timings[interval_key]):
                return

    # -- sessions ----------------------------------------------------------------------

    def register_session(self, info, replace=False):
        """Register a session from the API; its presented keypair is kept for rehydration.

        A session id that another live process holds is refused unless `replace`: taking
        it over silently would kill the first session's token and overwrite its key file.
        """
        holder = self.registry.holder(info)
        if holder is not None and not replace:
            raise RpcError.of(CONFLICT, 'session_exists',
                              'session %s is held by another live process (pid %d); pass '
                              'replace to take it over' % (info.session_id, holder.pid),
                              session_id=info.session_id, pid=holder.pid)
        if info.presence is not None:
            keystore.remember(self.paths, info.mesh, info.session_id, info.session_pubkey,
                              info.presence['session_secret_key'])
        return self.registry.register(info)

    def member_pubkey(self, slug):
        mesh = self.meshes.get(slug)
        return mesh.get('pubkey') if mesh else None

    def _on_session_registered(self, info):
        log.info('session_registered', extra={'fields': {
            'sessionId': info.session_id, 'mesh': info.mesh, 'pid': info.pid,
            'presence': 'yes' if info.presence else 'no'}})
        self._open_session_link(info)
        self.wake_drain()
        self._publish_session_event('session_registered', info)

    def _on_session_deregistered(self, info):
        link = self.session_links.pop(info.token, None)
        if link is not None:
            link.close()
        self._publish_session_event('session_deregistered', info)

    def _publish_session_event(self, event, info):
        """A `system` event telling subscribers that a local session came or went."""
        self._publish('system', {'event': event, 'mesh': info.mesh, 'session_id': info.session_id,
                                 'display_name': info.display_name,
                                 'token_prefix': info.token_prefix})

    def _open_session_link(self, info):
        """Close any link of the same token or session key, then open this session's link."""
        if info.presence is None:
            return
        mesh = self.meshes.get(info.mesh)
        if mesh is None:
            log.warning('session_broker_no_mesh_config', extra={'fields': {'mesh': info.mesh}})
            return
        previous = self.session_links.pop(info.token, None)
        if previous is not None:
            previous.close()
        pubkey = info.session_pubkey
        for token, link in list(self.session_links.items()):
            if link.pubkey == pubkey:
                # One presence per session key: a ghost would steal the session's DMs (1.35.0).
                del self.session_links[token]
                link.close()
        self.session_links[info.token] = SessionLink(self, mesh, info).start()

    def session_link_by_pubkey(self, pubkey):
        for link in self.session_links.values():
            if link.pubkey == pubkey:
                return link
        return None

    def is_own_pubkey(self, pubkey, slug=None):
        """The member key of a joined mesh, or a live session key of this daemon."""
        pubkey = pubkey.lower()
        meshes = [self.meshes[slug]] if slug in self.meshes else list(self.meshes.values())
        if any(mesh['pubkey'].lower() == pubkey for mesh in meshes):
            return True
        return any(link.pubkey == pubkey for link in self.session_links.values())

    def publish_event(self, kind, data):
        self._publish(kind, data)

    def _publish(self, kind, data):
        if self.bus is None:
            return
        try:
            self.bus.publish(kind, data)
        except Exception:
            log.exception('event publish failed')

    def _rehydrate_sessions(self):
        """Revive persisted sessions whose process still runs (spec/daemon.md §4.5)."""
        try:
            rows = self.registry.persisted_rows()
        except Exception as exc:
            log.warning('session_rehydrate_scan_failed', extra={'fields': {'err': str(exc)}})
            return
        revived = []
        for info in rows:
            try:
                if not procs.is_alive(info.pid):
                    continue
                live = procs.start_time(info.pid)
                if info.start_time and live and not procs.same_start(info.start_time, live):
                    continue
                mesh = self.meshes.get(info.mesh)
                if mesh is None:
                    continue
                info.presence = self._fresh_presence(mesh, info.session_id)
                self.registry.register(info)
                revived.append(info.token)
            except Exception as exc:
                log.warning('session_rehydrate_failed', extra={'fields': {
                    'token': info.token[:8], 'mesh': info.mesh, 'err': str(exc)}})
        self.registry.delete_rows_except(revived)
        if rows:
            # claudemesh writes this info line to stderr; meshd keeps the stream.
            log.warning('sessions_rehydrated', extra={'fields': {
                'revived': len(revived), 'persisted': len(rows)}})

    def _fresh_presence(self, mesh, session_id):
        keypair = keystore.load_or_create(self.paths, mesh['slug'], session_id)
        wire = crypto.make_attestation(mesh['pubkey'], mesh['secretKey'], keypair.public_key,
                                       clock.now_ms() + ATTESTATION_TTL_MS)
        # The local API names fields in snake_case; the wire's camelCase is for broker links.
        attestation = {'session_pubkey': wire['sessionPubkey'],
                       'parent_member_pubkey': wire['parentMemberPubkey'],
                       'expires_at': wire['expiresAt'], 'signature': wire['signature']}
        return {'session_pubkey': keypair.public_key, 'session_secret_key': keypair.secret_key,
                'parent_attestation': attestation}

    # -- config ------------------------------------------------------------------------

    def reload_config(self):
        """Attach meshes newly listed in config.json and detach those no longer listed."""
        try:
            config = config_mod.load_config(self.paths.config)
        except ConfigError as exc:
            message = 'config unreadable: %s: %s' % (self.paths.config, _detail(exc))
            log.warning('config_reload_failed', extra={'fields': {'err': message}})
            raise RpcError.of(INVALID_PARAMS, 'config_unreadable', message)
        wanted = {mesh['slug']: mesh for mesh in config['meshes']}
        changed = {slug for slug in set(wanted) & set(self.meshes)
                   if wanted[slug] != self.meshes[slug]}
        detached = sorted((set(self.meshes) - set(wanted)) | changed)
        attached = sorted((set(wanted) - set(self.meshes)) | changed)
        for slug in detached:
            self._detach_mesh(slug)
        self.config = config
        self.meshes = wanted
        for slug in attached:
            self._attach_mesh(slug)
        log.info('config_reloaded', extra={'fields': {'attached': attached,
                                                      'detached': detached}})
        return {'ok': True, 'attached': attached, 'detached': detached,
                'meshes': sorted(self.meshes)}

    def _attach_mesh(self, slug):
        """Start the member link of `slug`, and session links of its registered sessions."""
        self.links[slug] = MemberLink(self, self.meshes[slug]).start()
        for info in self.registry.all():
            if info.mesh == slug and info.token not in self.session_links:
                self._open_session_link(info)

    def _detach_mesh(self, slug):
        """Close the member link of `slug` and the session links bound to it."""
        link = self.links.pop(slug, None)
        if link is not None:
            link.close()
        for token, session_link in list(self.session_links.items()):
            if session_link.mesh['slug'] == slug:
                del self.session_links[token]
                session_link.close()

    def _watch_clock(self):
        """Reconnect every link at once when wall-clock time jumps (a laptop woke up)."""
        interval = self.timings['clock_check_interval']
        last_wall, last_mono = time.time(), time.monotonic()
        while not self._stop.wait(interval):
            wall, mono = time.time(), time.monotonic()
            jump = (wall - last_wall) - (mono - last_mono)
            last_wall, last_mono = wall, mono
            if abs(jump) >= self.timings['clock_jump_threshold']:
                log.info('clock_jump_detected', extra={'fields': {'jump_ms': int(jump * 1000)}})
                for link in list(self.links.values()) + list(self.session_links.values()):
                    link.reconnect_now('clock_jump')

    # -- API support -------------------------------------------------------------------

    def health(self):
        return {'ok': True, 'pid': os.getpid(), 'epoch': self.epoch,
                'tcp': self.server.tcp_address if self.server else None,
                'brokers': {slug: link.health() for slug, link in self.links.items()},
                'sessions': {token[:8]: link.health()
                             for token, link in self.session_links.items()}}

    def wake_drain(self):
        self.drain_wakeup.set()

    # -- running and stopping ----------------------------------------------------------

    def run(self):
        """Start, serve until SIGTERM/SIGINT, shut down; return the exit status."""
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
        self.shutdown(self._stop_signal)
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

    def request_stop(self, reason='request'):
        """Stop as if signalled (tests running the daemon in-process use it)."""
        self._handle_stop(reason)

    def shutdown(self, reason=None):
        """Ordered, idempotent shutdown (DESIGN.md 10); each step isolated from the others."""
        self._stop.set()
        log.info('daemon_shutdown', extra={'fields': {'signal': reason}})
        systemd.notify('STOPPING=1')
        grace = self.timings['shutdown_grace']
        steps = (
            ('rpc listeners', lambda: self.server and self.server.stop(grace)),
            ('database writer', lambda: storage_db.writer.stop(grace)),
            ('background tasks', lambda: self.group.kill(timeout=grace)),
            ('member links', lambda: self._close_links(self.links)),
            ('session links', lambda: self._close_links(self.session_links)),
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

    def _close_links(self, links):
        for link in list(links.values()):
            link.close()
        links.clear()

    def _close_database(self):
        if self._db_open:
            storage_db.close_database()
            self._db_open = False


def _detail(exc):
    """A ConfigError's text without the 'Failed to load <path>: ' prefix."""
    text = str(exc)
    marker = ': '
    if text.startswith('Failed to load ') and marker in text[len('Failed to load '):]:
        return text.split(marker, 1)[1]
    return text
