"""Start the daemon on demand for CLI verbs (spec/daemon.md §10.2, `ensure_daemon_ready`).

A verb that needs the daemon probes it; when nothing answers it starts one in the
background, unless a service manager owns the daemon (then it waits for it), auto-spawn is
off (`MESHD_NO_AUTOSPAWN=1`, which the spawned daemon also carries so it can never spawn
itself), or a spawn failed less than 30 s ago. Concurrent callers share one spawn through
`.spawn.lock`; the daemon's own flock makes a duplicate start harmless anyway.
"""
import fcntl
import os
import subprocess
import time

from rpc.client import RpcCallError, RpcClient, RpcConnectionError

from meshd import files
from meshd.pidfile import read_running_pid

PROBE_TIMEOUT = 2.5
SPAWN_BUDGET = 10.0      # claudemesh allows 3 s; a loaded machine needs longer for Python
SERVICE_WAIT = 8.0
FAILURE_QUIET = 30.0
POLL = 0.15

_cached = {}


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


def service_managed(home=None):
    """True when a systemd user unit for meshd is installed or enabled (never spawn then)."""
    home = home or os.path.expanduser('~')
    units = os.path.join(home, '.config', 'systemd', 'user')
    return any(os.path.exists(path) for path in (
        os.path.join(units, 'meshd.service'),
        os.path.join(units, 'default.target.wants', 'meshd.service')))


def _poll_up(paths, budget):
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        if probe(paths, timeout=1.0) == 'up':
            return True
        time.sleep(POLL)
    return False


def ensure_daemon(paths, command, environ=None, allow_spawn=True):
    """Return (state, detail): 'up', 'started', or why the daemon cannot be reached."""
    environ = os.environ if environ is None else environ
    if _cached.get(paths.socket) in ('up', 'started'):
        return _cached[paths.socket], None
    state = probe(paths)
    if state == 'up':
        _cached[paths.socket] = 'up'
        return 'up', None
    if state == 'busy':
        return 'busy', ('the daemon (pid %s) is running but at its connection limit; '
                        'try again' % read_running_pid(paths.pid_file))
    if service_managed():
        if _poll_up(paths, SERVICE_WAIT):
            _cached[paths.socket] = 'up'
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
    if not _spawn(paths, command, environ, marker):
        return 'spawn-failed', 'the daemon did not answer within %ds' % SPAWN_BUDGET
    _cached[paths.socket] = 'started'
    return 'started', 'took %dms' % ((time.monotonic() - started) * 1000)


def _spawn(paths, command, environ, marker):
    lock_path = os.path.join(paths.daemon_dir, '.spawn.lock')
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _poll_up(paths, SPAWN_BUDGET)  # another caller is starting it
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode('ascii'))
        log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        env = dict(environ, MESHD_NO_AUTOSPAWN='1')
        env.pop('MESHD_SESSION_TOKEN_FILE', None)
        subprocess.Popen(command + ['daemon', 'up', '--foreground'], stdin=subprocess.DEVNULL,
                         stdout=log_fd, stderr=log_fd, env=env, start_new_session=True,
                         close_fds=True)
        os.close(log_fd)
        if _poll_up(paths, SPAWN_BUDGET):
            try:
                os.unlink(marker)
            except FileNotFoundError:
                pass
            return True
        files.write_private(marker, str(int(time.time())))
        return False
    finally:
        os.close(fd)
