"""`meshd daemon up|down|status|accept-host` and `meshd quickstart`.

control and fingerprint (psutil) are imported by the commands that use them, not here: this
module is loaded to build the parser of every command, `meshd send` too."""
import os
import sys

from meshd.argh_compat import arg
from rpc.client import RpcCallError, RpcClient, RpcConnectionError

from meshd import config as config_mod, files
from meshd.cli.daemon_client import load_config
from meshd.cli.output import invoked_as, print_json, report
from meshd.exceptions import CommandFailed, DaemonExited, SpawnTimeout, StopTimeout, UsageError
from meshd.paths import Paths


@arg('--foreground', default=False, action='store_true',
          help='run in this process (for service managers and tests)')
@arg('--tcp', default=False, action='store_true', help='force the TCP listener on')
@arg('--no-tcp', default=False, action='store_true', help='turn the TCP listener off')
@arg('--tcp-port', default=None, type=int, help='TCP port on 127.0.0.1 (0 = a free port)')
@arg('--clone-policy', default=None, choices=config_mod.CLONE_POLICIES,
          help='on a host fingerprint mismatch: refuse (default), warn or allow')
@arg('--durability', default=None, choices=config_mod.DURABILITIES,
          help='full (default) or normal: trade the last commits on power loss for speed')
@arg('--public-health', default=False, action='store_true',
          help='answer daemon.health on TCP without auth (for a local health probe)')
@arg('--json', default=False, action='store_true', help='machine-readable output')
def up(*, foreground=False, tcp=False, no_tcp=False, tcp_port=None, clone_policy=None,
       durability=None, public_health=False, json=False):
    """Start the daemon (detached unless --foreground); returns once its socket answers."""
    if tcp and no_tcp:
        raise UsageError('--tcp and --no-tcp cannot be combined')
    paths = Paths()
    options = config_mod.build_options(
        load_config(paths), tcp='on' if tcp else ('off' if no_tcp else None),
        tcp_port=tcp_port, clone_policy=clone_policy, durability=durability,
        public_health=True if public_health else None)
    if foreground:
        _run_foreground(paths, options)
    flags = ['--tcp'] if tcp else (['--no-tcp'] if no_tcp else [])
    if tcp_port is not None:
        flags += ['--tcp-port', str(tcp_port)]
    if clone_policy:
        flags += ['--clone-policy', clone_policy]
    if durability:
        flags += ['--durability', durability]
    if public_health:
        flags += ['--public-health']
    _start_detached(paths, flags, json)


def _run_foreground(paths, options):
    """Run the daemon in this process; a DaemonExit reaches cli.main with its exit code."""
    from meshd import log as meshd_log
    from meshd.daemon import Daemon
    meshd_log.setup(debug=bool(os.environ.get('MESHD_DEBUG')))
    code = Daemon(paths, options).run()
    sys.stdout.flush()
    sys.exit(code)


def _start_detached(paths, flags, as_json):
    from meshd import control
    try:
        started = control.spawn_detached(paths, flags)
    except DaemonExited as exc:
        if as_json:
            report(True, {'ok': False, 'reason': 'daemon_exited', 'status': exc.status,
                          'log': paths.log}, '', exc.exit_code)
        raise CommandFailed('✘ %s' % exc, exc.exit_code) from exc
    except SpawnTimeout as exc:
        if as_json:
            report(True, {'ok': False, 'reason': 'socket_not_appeared', 'log': paths.log}, '', 1)
        raise CommandFailed('✘ %s' % exc) from exc
    if started['already_running']:
        report(as_json, {'ok': True, 'detached': True, 'pid': started['pid'],
                         'already_running': True},
               'daemon already running (pid %s)' % started['pid'])
        return
    report(as_json, {'ok': True, 'detached': True, 'pid': started['pid'], 'log': paths.log},
           '✔ daemon started (pid %d)\n→ log: %s\n→ stop: %s daemon down'
           % (started['pid'], paths.log, invoked_as()))


@arg('--json', default=False, action='store_true', help='machine-readable output')
def down(*, json=False):
    """Stop the daemon: SIGTERM, then wait for the process to exit."""
    from meshd import control
    paths = Paths()
    try:
        pid = control.stop(paths)
    except StopTimeout as exc:
        if json:
            report(True, {'stopped': False, 'pid': exc.pid, 'reason': 'shutdown_timeout'}, '', 1)
        raise
    if pid is None:
        report(json, {'stopped': False, 'reason': 'not_running'}, 'daemon: not running')
    else:
        report(json, {'stopped': True, 'pid': pid}, 'daemon: stopped (was pid %d)' % pid)


@arg('--json', default=False, action='store_true', help='machine-readable output')
def status(*, json=False):
    """Show whether the daemon runs, its version and its health."""
    from meshd import control
    paths = Paths()
    pid = control.running_pid(paths)
    if pid is None:
        report(json, {'running': False}, 'daemon: not running', code=1)
    try:
        with RpcClient(socket_path=paths.socket, timeout=5.0) as client:
            version = client.call('daemon.version')
            health = client.call('daemon.health')
    except (RpcConnectionError, RpcCallError) as exc:
        report(json, {'running': True, 'pid': pid, 'ipc_error': str(exc)},
               'daemon: pid %d alive but IPC unreachable (%s)' % (pid, exc), code=1)
    if json:
        print_json({'running': True, 'pid': pid, 'version': version, 'health': health})
        return
    print('daemon: running (pid %d)' % pid)
    print('socket: %s' % paths.socket)
    print('daemon %s (ipc %s, schema %s)' % (version['daemon_version'], version['ipc_api'],
                                            version['schema_version']))
    if health.get('tcp'):
        print('tcp: %s' % health['tcp'])
    for slug, link in sorted(health.get('brokers', {}).items()):
        print('mesh %s: %s (%s)' % (slug, link.get('status'), link.get('state')))


@arg('--json', default=False, action='store_true', help='machine-readable output')
def accept_host(*, json=False):
    """Write a fresh host fingerprint (after moving the daemon directory to a new host)."""
    from meshd import fingerprint
    paths = Paths()
    files.ensure_private_dir(paths.daemon_dir)
    record = fingerprint.write_record(paths.fingerprint, fingerprint.HostIdentity())
    report(json, {'ok': True, 'fingerprint_prefix': record['fingerprint'][:16]},
           'host fingerprint accepted: %s…' % record['fingerprint'][:16])


def quickstart():
    """Start a local broker and two daemons (alice, bob) and send a DM between them."""
    from meshd import control, quickstart as quickstart_mod
    quickstart_mod.main(control.entry_command(), Paths().home)


COMMANDS = [up, down, status, accept_host]
