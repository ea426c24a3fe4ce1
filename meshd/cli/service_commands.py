"""`meshd daemon install-service`: write (or remove) the systemd user unit, and with --now
start it and wait for the daemon's first broker link.

control (psutil) is imported by the command, not here: this module is loaded to
build the parser of every command, `meshd send` too."""
import os
import shutil
import sys

from meshd.argh_compat import arg

from meshd import files, service
from meshd.cli.output import print_json, report
from meshd.exceptions import CommandFailed, ControlError
from meshd.paths import Paths


def _uninstall(path, as_json):
    if not os.path.exists(path):
        report(as_json, {'ok': True, 'removed': None}, 'no service unit installed')
        return
    # Best effort: the user manager may not run (a container, an ssh session without lingering).
    service.systemctl('disable', '--now', service.UNIT_NAME, check=False)
    os.unlink(path)
    service.systemctl('daemon-reload', check=False)
    report(as_json, {'ok': True, 'removed': path}, 'removed: %s' % path)


def _boot(paths, as_json, result):
    from meshd import control
    service.systemctl('daemon-reload')
    service.systemctl('enable', '--now', service.UNIT_NAME)
    health = control.wait_ready(paths)
    if health is None:
        if as_json:
            report(True, dict(result, ok=False, reason='service_not_ready'), '', 1)
        raise CommandFailed('✘ service-managed daemon not responding within %ds (run '
                            '`systemctl --user status %s`)'
                            % (control.READY_TIMEOUT, service.UNIT_NAME))
    brokers = health.get('brokers') or {}
    result = dict(result, started=True, pid=health.get('pid'),
                  brokers={slug: link.get('status') for slug, link in sorted(brokers.items())})
    if as_json:
        print_json(result)
        return
    print('daemon running under systemd (pid %s)' % health.get('pid'))
    if not brokers:
        print('no mesh joined yet: meshd join <invite-url>')
        return
    opened = sorted(slug for slug, link in brokers.items() if link.get('status') == 'open')
    if opened:
        print('broker connected (mesh=%s)' % ','.join(opened))
    else:
        print('warning: no broker connected within %ds: %s' % (control.READY_TIMEOUT, ', '.join(
            '%s=%s(%s)' % (slug, link.get('status'), link.get('state'))
            for slug, link in sorted(brokers.items()))), file=sys.stderr)


@arg('--force', default=False, action='store_true',
          help='install even on a CI host or inside a container')
@arg('--uninstall', default=False, action='store_true',
          help='disable and delete the unit instead')
@arg('--now', default=False, action='store_true',
          help='also run the boot command and wait for the daemon')
@arg('--json', default=False, action='store_true', help='machine-readable output')
def install_service(*, force=False, uninstall=False, now=False, json=False):
    """Write the systemd user unit that runs the daemon (--uninstall removes it)."""
    from meshd import control
    if not sys.platform.startswith('linux'):
        raise CommandFailed('install-service writes systemd user units: Linux only for now')
    path = service.unit_path()
    if uninstall:
        _uninstall(path, json)
        return
    reason = service.refusal_reason()
    if reason and not force:
        raise CommandFailed('install-service refused: %s (add --force to install anyway)'
                            % reason)
    try:
        command = control.entry_command()
    except ControlError as exc:
        raise CommandFailed('install-service: %s' % exc) from exc
    if len(command) == 2 and not os.path.isfile(command[1]):
        raise CommandFailed('install-service: the meshd entry point %s does not exist'
                            % command[1])
    paths = Paths()
    files.ensure_private_dir(paths.daemon_dir)
    try:
        text = service.render_unit(command, meshd_home=os.environ.get('MESHD_HOME'))
    except ValueError as exc:
        raise CommandFailed('install-service: %s' % exc) from exc
    if now and shutil.which('systemctl') is None:
        raise CommandFailed('install-service --now: systemctl not found on PATH (is systemd '
                            'running here?)')
    if now:
        # The unit's daemon needs the lock: stop an old unit and a daemon started by hand.
        service.systemctl('stop', service.UNIT_NAME, check=False)
        control.stop(paths)
    service.write_unit(path, text)
    result = {'ok': True, 'platform': 'linux', 'unitPath': path,
              'bootCommand': service.BOOT_COMMAND}
    if not json:
        print('installed linux service unit: %s' % path)
        if not now:
            print('bring it up now: %s' % service.BOOT_COMMAND)
    if now:
        _boot(paths, json, result)
    elif json:
        print_json(result)
