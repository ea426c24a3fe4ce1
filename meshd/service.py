"""The daemon as a systemd user service (spec/daemon.md §10.4): the unit, where it goes,
when not to install one, and systemctl. The command is meshd/cli/service_commands.py.

The unit written here is the one the Debian package ships as /usr/lib/systemd/user/meshd.service
(packaging/debian/meshd.user.service), with ExecStart on this install's absolute interpreter and
entry point instead of /usr/bin/meshd: the checkout's meshd.py, the single file itself, or the
packaged /usr/share/meshd/meshd.py. Linux only; macOS's launchd plist is not written yet.

A persistent service on a CI host or inside a container outlives the job or is never started, so
both are refused with one line unless --force. `systemctl` is looked up on PATH, so tests can put
a stand-in first.
"""
import os
import shutil
import subprocess

from meshd import container, files
from meshd.exceptions import CommandFailed

UNIT_NAME = 'meshd.service'
UNIT_MODE = 0o644
BOOT_COMMAND = 'systemctl --user daemon-reload && systemctl --user enable --now %s' % UNIT_NAME
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


def installed(home=None):
    """True when the user unit is installed or enabled: the daemon is the service manager's."""
    path = unit_path(home)
    return any(os.path.exists(candidate) for candidate in (
        path, os.path.join(os.path.dirname(path), 'default.target.wants', UNIT_NAME)))


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


# -- systemctl and the unit file ----------------------------------------------------------

def systemctl(*args, check=True):
    """Run `systemctl --user ARGS`; with check, a failure raises CommandFailed."""
    binary = shutil.which('systemctl')
    if binary is None:
        if check:
            raise CommandFailed('systemctl not found on PATH: run `%s` where systemd runs'
                                % BOOT_COMMAND)
        return None
    argv = [binary, '--user'] + list(args)
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=SYSTEMCTL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if check:
            raise CommandFailed('systemctl --user %s failed: %s' % (' '.join(args), exc))
        return None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise CommandFailed('systemctl --user %s failed (status %d): %s'
                            % (' '.join(args), result.returncode,
                               detail[0] if detail else 'no output'))
    return result


def write_unit(path, text):
    """Replace the unit atomically, 0644 from creation."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_atomic(path, text, UNIT_MODE)
