"""Controlling the daemon from another process: find it, start it, stop it.

One place for what the CLI, auto-start (spec/daemon.md §10.2), the service installer and
quickstart need: the command that runs this same meshd install (`entry_command`), whether
a daemon answers (`probe`, `version`), starting one in the background and waiting for its
socket (`spawn_detached`, `ensure_running`), and stopping one (`stop`). Failures raise
a ControlError (exceptions.py); the CLI turns it into one stderr line and an exit code.

Auto-start never spawns while a service manager owns the daemon (it waits for it), when
`MESHD_NO_AUTOSPAWN=1` (the spawned daemon carries it, so it can never spawn itself), or
within 30 s of a failed spawn. Concurrent callers share one spawn through `.spawn.lock`;
the daemon's own flock makes a duplicate start harmless anyway.
"""
import fcntl
import os
import signal
import subprocess
import sys
import time
import zipfile

import psutil
from rpc.client import RpcCallError, RpcClient, RpcConnectionError

import meshd
from meshd import files, service
from meshd.exceptions import ControlError, DaemonExited, SpawnTimeout, StopTimeout
from meshd.pidfile import read_running_pid

PROBE_TIMEOUT = 2.5
SPAWN_TIMEOUT = 10.0     # claudemesh allows 3 s; a loaded machine needs longer for Python
STOP_TIMEOUT = 15.0      # longer than the daemon's shutdown grace
SERVICE_WAIT = 8.0
READY_TIMEOUT = 15.0     # a broker link opens well within this (spec/daemon.md §10.4)
FAILURE_QUIET = 30.0
POLL = 0.1

_known_up = set()        # sockets this process already found answering


def entry_command(executable=None, package_file=None, argv0=None):
    """[absolute python3, absolute meshd entry] of this install.

    The single file: the archive itself (the package is imported from inside it). A checkout,
    or the Debian package's /usr/share/meshd: the meshd.py beside the package. A virtualenv
    install: its console script. The interpreter keeps its path unresolved, so a virtualenv's
    python stays the virtualenv's.
    """
    executable = executable if executable is not None else sys.executable
    if not executable:
        raise ControlError('cannot tell which Python interpreter runs meshd')
    executable = os.path.abspath(executable)
    package_file = os.path.abspath(package_file or meshd.__file__)
    package_root = os.path.dirname(os.path.dirname(package_file))
    if os.path.isfile(package_root) and zipfile.is_zipfile(package_root):
        return [executable, package_root]
    script = os.path.join(package_root, 'meshd.py')
    if os.path.isfile(script):
        return [executable, script]
    argv0 = os.path.abspath(argv0 if argv0 is not None else sys.argv[0])
    if os.path.isfile(argv0) and os.path.basename(argv0) != '__main__.py':
        return [executable, argv0]
    return [executable, '-m', 'meshd']


def ask(paths, method, timeout=PROBE_TIMEOUT):
    """The result of `method` (no parameters) from the daemon on `paths.socket`, or None when
    nothing answers it."""
    if not os.path.exists(paths.socket):
        return None
    try:
        with RpcClient(socket_path=paths.socket, timeout=timeout) as client:
            return client.call(method)
    except (RpcConnectionError, RpcCallError, ValueError):
        return None


def version(paths, timeout=PROBE_TIMEOUT):
    """daemon.version of the daemon on `paths.socket`, or None when nothing answers."""
    return ask(paths, 'daemon.version', timeout)


def probe(paths, timeout=PROBE_TIMEOUT):
    """'up', 'absent' (no socket), 'busy' (the daemon runs but every connection it can
    take is working) or 'stale' (a socket nobody answers on)."""
    if not os.path.exists(paths.socket):
        return 'absent'
    try:
        with RpcClient(socket_path=paths.socket, timeout=timeout) as client:
            client.call('daemon.version')
        return 'up'
    except RpcCallError as exc:
        return 'busy' if exc.slug == 'busy' else 'stale'
    except RpcConnectionError:
        # A full listen queue (EAGAIN), no answer in time or a refused connection, from a
        # daemon that holds its lock: it is running, not down, and starting another one
        # would not help.
        return 'busy' if read_running_pid(paths.pid_file) is not None else 'stale'
    except ValueError:
        return 'stale'


def wait_up(paths, budget):
    """Wait up to `budget` seconds for the daemon to answer; True when it did."""
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        if version(paths, timeout=1.0) is not None:
            return True
        time.sleep(POLL)
    return False


def ensure_running(paths, allow_spawn=True, environ=None):
    """Return (state, detail): 'up', 'started', or why the daemon cannot be reached
    ('busy', 'down', 'service-not-ready', 'spawn-suppressed', 'spawn-failed')."""
    environ = os.environ if environ is None else environ
    if paths.socket in _known_up:
        return 'up', None
    state = probe(paths)
    if state == 'up':
        _known_up.add(paths.socket)
        return 'up', None
    if state == 'busy':
        return 'busy', ('the daemon (pid %s) is running but at its connection limit; '
                        'try again' % read_running_pid(paths.pid_file))
    if service.installed():   # the service manager starts it: never spawn a second one
        if wait_up(paths, SERVICE_WAIT):
            _known_up.add(paths.socket)
            return 'up', None
        return 'service-not-ready', ('service-managed daemon not responding within %dms '
                                     '(run `systemctl --user status meshd.service`)'
                                     % (SERVICE_WAIT * 1000))
    if not allow_spawn or environ.get('MESHD_NO_AUTOSPAWN') == '1':
        return 'down', 'not running (auto-start is off)'
    files.ensure_private_dir(paths.daemon_dir)
    marker = os.path.join(paths.daemon_dir, '.spawn-failure')
    try:
        if time.time() - os.stat(marker).st_mtime < FAILURE_QUIET:
            return 'spawn-suppressed', 'a start failed less than %ds ago' % FAILURE_QUIET
    except FileNotFoundError:
        pass
    started = time.monotonic()
    if not _spawn_shared(paths, environ, marker):
        return 'spawn-failed', 'the daemon did not answer within %ds' % SPAWN_TIMEOUT
    _known_up.add(paths.socket)
    return 'started', 'took %dms' % ((time.monotonic() - started) * 1000)


def _spawn_shared(paths, environ, marker):
    lock_path = os.path.join(paths.daemon_dir, '.spawn.lock')
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return wait_up(paths, SPAWN_TIMEOUT)  # another caller is starting it
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode('ascii'))
        env = dict(environ)
        env.pop('MESHD_SESSION_TOKEN_FILE', None)
        start_detached(paths, [], env)
        if wait_up(paths, SPAWN_TIMEOUT):
            try:
                os.unlink(marker)
            except FileNotFoundError:
                pass
            return True
        files.write_private(marker, str(int(time.time())))
        return False
    finally:
        os.close(fd)


def start_detached(paths, flags, environ=None):
    """Start `meshd daemon up --foreground FLAGS` in a new session, its output appended to
    the daemon log; return the child. It carries MESHD_NO_AUTOSPAWN=1."""
    files.ensure_private_dir(paths.daemon_dir)
    log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    # The daemon rotates this file (meshd/log.py LogRotation) because it knows it writes it.
    env = dict(os.environ if environ is None else environ, MESHD_NO_AUTOSPAWN='1',
               MESHD_DETACHED_LOG=paths.log)
    try:
        return subprocess.Popen(entry_command() + ['daemon', 'up', '--foreground'] + flags,
                                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                start_new_session=True, env=env, close_fds=True)
    finally:
        os.close(log_fd)


def spawn_detached(paths, flags):
    """`daemon up` without --foreground: start a daemon and return once its socket answers.

    Returns {pid, already_running}; DaemonExited when the child exits first (with the end
    of its log), SpawnTimeout when the socket does not answer within SPAWN_TIMEOUT.
    """
    if version(paths) is not None:
        return {'pid': read_running_pid(paths.pid_file), 'already_running': True}
    child = start_detached(paths, flags)
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            tail = (files.read_text(paths.log) or '').strip().splitlines()[-3:]
            raise DaemonExited(code, tail, paths.log)
        if version(paths, timeout=1.0) is not None:
            return {'pid': child.pid, 'already_running': False}
        time.sleep(POLL)
    raise SpawnTimeout(SPAWN_TIMEOUT, paths.log)


def running_pid(paths):
    """The pid of the running daemon (its pid file names a live meshd process), or None."""
    return read_running_pid(paths.pid_file)


def stop(paths, timeout=STOP_TIMEOUT):
    """SIGTERM the running daemon and wait for it to exit; return its pid, or None when no
    daemon runs. ControlError when it cannot be signalled, StopTimeout when it outlives
    `timeout`."""
    pid = running_pid(paths)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as exc:
        raise ControlError('could not signal the daemon (pid %d): %s' % (pid, exc))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return pid
        time.sleep(POLL)
    raise StopTimeout(pid, timeout)


def wait_ready(paths, timeout=READY_TIMEOUT):
    """Poll daemon.health until a broker link is open (or no mesh is joined); the last
    health seen, or None when the daemon never answered."""
    deadline = time.monotonic() + timeout
    health = None
    while True:
        health = ask(paths, 'daemon.health', timeout=2.0) or health
        if health is not None:
            brokers = health.get('brokers') or {}
            if not brokers or any(link.get('status') == 'open' for link in brokers.values()):
                return health
        if time.monotonic() >= deadline:
            return health
        time.sleep(POLL)


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
