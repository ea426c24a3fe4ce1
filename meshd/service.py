"""`meshd daemon install-service`: the daemon as a systemd user service (spec/daemon.md §10.4).

The unit written here is the one the Debian package ships as /usr/lib/systemd/user/meshd.service
(packaging/debian/meshd.user.service), with ExecStart on this install's absolute interpreter and
entry point instead of /usr/bin/meshd: the checkout's meshd.py, the single file itself, or the
packaged /usr/share/meshd/meshd.py. Linux only; macOS's launchd plist is not written yet.

A persistent service on a CI host or inside a container outlives the job or is never started, so
both are refused with one line unless --force. `systemctl` is looked up on PATH, so tests can put
a stand-in first. This module does not patch gevent: the entry point has done it.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import argh
import psutil
from rpc.client import RpcCallError, RpcClient, RpcConnectionError

import meshd
from meshd import container, files
from meshd.paths import Paths
from meshd.pidfile import read_running_pid

UNIT_NAME = 'meshd.service'
UNIT_MODE = 0o644
BOOT_COMMAND = 'systemctl --user daemon-reload && systemctl --user enable --now %s' % UNIT_NAME
READY_TIMEOUT = 15.0       # seconds --now waits for a broker link to open (spec/daemon.md §10.4)
STOP_TIMEOUT = 15.0        # seconds --now waits for a daemon started outside systemd to exit
SYSTEMCTL_TIMEOUT = 60.0
UNIT_PATH_VARIABLE = 'PATH=/usr/local/bin:/usr/bin:/bin'

UNIT_TEMPLATE = """\
# meshd: the per-user daemon as a systemd user service (spec/daemon.md §10.4).
# %(origin)s
[Unit]
Description=meshd mesh daemon (messages between agent sessions)
Documentation=man:meshd(1)
# No network-online.target: the user manager cannot see that system target, and broker
# links retry with backoff until the network is up.

[Service]
# The daemon sends READY=1 once its socket answers (after migrations and binding).
Type=notify
# No shell wrapper, so signals reach the Python process; --foreground because a
# detached daemon would leave the service manager watching the wrong process.
ExecStart=%(exec_start)s daemon up --foreground
# HUP re-reads config.json, as daemon.reload does.
ExecReload=/bin/kill -HUP $MAINPID
# TERM is graceful, so the default KillSignal fits; longer than the shutdown grace period.
TimeoutStopSec=30
Restart=on-failure
RestartSec=3
# Exit 2 = unreadable config or usage error, 4 = host fingerprint refused
# (`meshd daemon accept-host` accepts a new host): a restart cannot fix either.
RestartPreventExitStatus=2 4
# No StandardOutput=: output goes to the journal (journalctl --user -u meshd).
%(environment)s

[Install]
WantedBy=default.target
"""
ORIGIN_INSTALL_SERVICE = ('Written by `meshd daemon install-service`; '
                          'remove it with `meshd daemon install-service --uninstall`.')


# -- the unit ---------------------------------------------------------------------------

def _escape_specifiers(text):
    if '\n' in text:
        raise ValueError('a newline cannot appear in a unit file value: %r' % text)
    return text.replace('%', '%%')


def quote_exec_arg(arg):
    """One ExecStart word: % and $ escaped, double-quoted when it holds a space or a quote."""
    escaped = _escape_specifiers(arg).replace('$', '$$')
    if escaped and not any(c in escaped for c in ' \t"\'\\;'):
        return escaped
    return '"%s"' % escaped.replace('\\', '\\\\').replace('"', '\\"')


def _environment_line(assignment):
    escaped = _escape_specifiers(assignment)
    if any(c in escaped for c in ' \t"\'\\'):
        escaped = '"%s"' % escaped.replace('\\', '\\\\').replace('"', '\\"')
    return 'Environment=%s' % escaped


def render_unit(command, meshd_home=None, origin=ORIGIN_INSTALL_SERVICE):
    """The user unit's text; `command` is the argv that runs meshd (before `daemon up`)."""
    environment = [_environment_line(UNIT_PATH_VARIABLE),
                   "# ~/.local packages must not shadow the ones this interpreter was "
                   "installed with.",
                   _environment_line('PYTHONNOUSERSITE=1')]
    if meshd_home:
        environment.append(_environment_line('MESHD_HOME=%s' % os.path.abspath(meshd_home)))
    return UNIT_TEMPLATE % {'origin': origin,
                            'exec_start': ' '.join(quote_exec_arg(arg) for arg in command),
                            'environment': '\n'.join(environment)}


def unit_path(home=None):
    """~/.config/systemd/user/meshd.service, where the CLI looks for a service-managed daemon."""
    home = home or os.path.expanduser('~')
    return os.path.join(home, '.config', 'systemd', 'user', UNIT_NAME)


def entry_command(executable=None, package_file=None, argv0=None):
    """[absolute python3, absolute meshd entry] for this install.

    The single file: the archive itself (the package is imported from inside it). A checkout,
    or the Debian package's /usr/share/meshd: the meshd.py beside the package. A virtualenv
    install: its console script. The interpreter keeps its path unresolved, so a virtualenv's
    python stays the virtualenv's.
    """
    executable = executable if executable is not None else sys.executable
    if not executable:
        raise ValueError('cannot tell which Python interpreter runs meshd')
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


def refusal_reason(environ=None):
    """Why installing a persistent service here is a mistake, or None."""
    environ = os.environ if environ is None else environ
    if container.in_ci(environ):
        names = [name for name in container.CI_VARIABLES if environ.get(name)]
        return ('this is a CI host (%s is set), where a persistent service would outlive the job'
                % names[0])
    if container.in_container(environ):
        return 'this is a container, where systemd user services rarely run'
    return None


# -- systemctl and the running daemon ------------------------------------------------------

def _fail(message, code=1):
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _systemctl(*args, check=True):
    """Run `systemctl --user ARGS`; with check, a failure is one line and exit 1."""
    binary = shutil.which('systemctl')
    if binary is None:
        if check:
            _fail('systemctl not found on PATH: run `%s` where systemd runs' % BOOT_COMMAND)
        return None
    argv = [binary, '--user'] + list(args)
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=SYSTEMCTL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            _fail('systemctl --user %s failed: %s' % (' '.join(args), exc))
        return None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        _fail('systemctl --user %s failed (status %d): %s'
              % (' '.join(args), result.returncode, detail[0] if detail else 'no output'))
    return result


def _stop_detached_daemon(paths):
    """SIGTERM a daemon started outside systemd, so the unit's own can take the lock."""
    pid = read_running_pid(paths.pid_file)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as exc:
        _fail('cannot stop the running daemon (pid %d): %s' % (pid, exc))
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return pid
        except psutil.NoSuchProcess:
            return pid
        time.sleep(0.1)
    _fail('the running daemon (pid %d) did not exit within %ds' % (pid, STOP_TIMEOUT))


def _health(paths):
    try:
        with RpcClient(socket_path=paths.socket, timeout=2.0) as client:
            return client.call('daemon.health')
    except (RpcConnectionError, RpcCallError, ValueError):
        return None


def _wait_ready(paths, timeout=READY_TIMEOUT):
    """Poll daemon.health until a broker link is open (or no mesh is joined); the last health."""
    deadline = time.monotonic() + timeout
    health = None
    while True:
        health = _health(paths) or health
        if health is not None:
            brokers = health.get('brokers') or {}
            if not brokers or any(link.get('status') == 'open' for link in brokers.values()):
                return health
        if time.monotonic() >= deadline:
            return health
        time.sleep(0.2)


def _write_unit(path, text):
    """Replace the unit atomically, 0644 from creation."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = '%s.%d.tmp' % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, UNIT_MODE)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as handle:
            handle.write(text)
        os.chmod(tmp, UNIT_MODE)   # the umask may have narrowed the creation mode
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _print_json(value):
    print(json.dumps(value, indent=2, ensure_ascii=False))


# -- the command ---------------------------------------------------------------------------

def _uninstall(path, as_json):
    if not os.path.exists(path):
        if as_json:
            _print_json({'ok': True, 'removed': None})
        else:
            print('no service unit installed')
        return
    # Best effort: the user manager may not run (a container, an ssh session without lingering).
    _systemctl('disable', '--now', UNIT_NAME, check=False)
    os.unlink(path)
    _systemctl('daemon-reload', check=False)
    if as_json:
        _print_json({'ok': True, 'removed': path})
    else:
        print('removed: %s' % path)


def _boot(paths, as_json, result):
    _systemctl('daemon-reload')
    _systemctl('enable', '--now', UNIT_NAME)
    health = _wait_ready(paths)
    if health is None:
        if as_json:
            _print_json(dict(result, ok=False, reason='service_not_ready'))
            sys.exit(1)
        _fail('✘ service-managed daemon not responding within %ds (run `systemctl --user status '
              '%s`)' % (READY_TIMEOUT, UNIT_NAME))
    brokers = health.get('brokers') or {}
    result = dict(result, started=True, pid=health.get('pid'),
                  brokers={slug: link.get('status') for slug, link in sorted(brokers.items())})
    if as_json:
        _print_json(result)
        return
    print('daemon running under systemd (pid %s)' % health.get('pid'))
    if not brokers:
        print('no mesh joined yet: meshd join <invite-url>')
        return
    opened = sorted(slug for slug, link in brokers.items() if link.get('status') == 'open')
    if opened:
        print('broker connected (mesh=%s)' % ','.join(opened))
    else:
        print('warning: no broker connected within %ds: %s' % (READY_TIMEOUT, ', '.join(
            '%s=%s(%s)' % (slug, link.get('status'), link.get('state'))
            for slug, link in sorted(brokers.items()))), file=sys.stderr)


@argh.arg('--force', default=False, action='store_true',
          help='install even on a CI host or inside a container')
@argh.arg('--uninstall', default=False, action='store_true',
          help='disable and delete the unit instead')
@argh.arg('--now', default=False, action='store_true',
          help='also run the boot command and wait for the daemon')
@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def install_service(*, force=False, uninstall=False, now=False, json=False):
    """Write the systemd user unit that runs the daemon (--uninstall removes it)."""
    if not sys.platform.startswith('linux'):
        _fail('install-service writes systemd user units: Linux only for now')
    path = unit_path()
    if uninstall:
        _uninstall(path, json)
        return
    reason = refusal_reason()
    if reason and not force:
        _fail('install-service refused: %s (add --force to install anyway)' % reason)
    try:
        command = entry_command()
    except ValueError as exc:
        _fail('install-service: %s' % exc)
    if len(command) == 2 and not os.path.isfile(command[1]):
        _fail('install-service: the meshd entry point %s does not exist' % command[1])
    paths = Paths()
    files.ensure_private_dir(paths.daemon_dir)
    try:
        text = render_unit(command, meshd_home=os.environ.get('MESHD_HOME'))
    except ValueError as exc:
        _fail('install-service: %s' % exc)
    if now and shutil.which('systemctl') is None:
        _fail('install-service --now: systemctl not found on PATH (is systemd running here?)')
    if now:
        # The unit's daemon needs the lock: stop an old unit and a daemon started by hand.
        _systemctl('stop', UNIT_NAME, check=False)
        _stop_detached_daemon(paths)
    _write_unit(path, text)
    result = {'ok': True, 'platform': 'linux', 'unitPath': path, 'bootCommand': BOOT_COMMAND}
    if not json:
        print('installed linux service unit: %s' % path)
        if not now:
            print('bring it up now: %s' % BOOT_COMMAND)
    if now:
        _boot(paths, json, result)
    elif json:
        _print_json(result)
