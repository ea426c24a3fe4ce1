"""Packaging (issue 5): the single-file build, its dependency check, and install-service.

The single file is built into a temporary directory and run from an empty one with no
PYTHONPATH: from the checkout, `import meshd` would find the package and hide a broken file
(STYLE.md §8). The Debian package is built and smoke-tested by .ci/run (packaging/build-deb,
packaging/ci-smoke), not here: too slow for the suite.
"""
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import unittest
import zipfile

import psutil
from rpc.client import RpcCallError, RpcClient, RpcConnectionError

from meshd import __version__, container, control, service
from tests.base import (DEADLINE, ENTRY, ROOT, TEST_TIMINGS, MeshdTestCase, free_port,
                        short_tempdir, wait_for)

BUILDER = os.path.join(ROOT, 'packaging', 'build_single_file.py')
PACKAGED_USER_UNIT = os.path.join(ROOT, 'packaging', 'debian', 'meshd.user.service')
PACKAGES = ('meshd', 'rpc', 'storage')

# Runs the single file as `python3 meshd.py ARGS` does, with one module made uninstallable.
MISSING_RUNNER = r'''
import runpy, sys
blocked, archive = sys.argv[1], sys.argv[2]

class Uninstalled:
    """A finder that makes `blocked` (and its submodules) look not installed."""
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == blocked or name.startswith(blocked + '.'):
            raise ModuleNotFoundError('No module named %r' % name, name=name)
        return None

sys.meta_path.insert(0, Uninstalled)
sys.argv = [archive] + sys.argv[3:]
runpy.run_path(archive, run_name='__main__')
'''


# Stand-in for systemctl: records its arguments; `enable --now` starts the unit's ExecStart the
# way systemd would (a clean environment plus the unit's Environment= lines), `disable --now`
# stops it. CONTAINER=1 keeps the daemon's TCP listener off, as the suite's other daemons.
FAKE_SYSTEMCTL = '''#!/bin/sh
echo "$*" >> "$SYSTEMCTL_LOG"
unit="$HOME/.config/systemd/user/meshd.service"
case "$*" in
"--user enable --now meshd.service")
    exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
    environment=$(sed -n 's/^Environment=//p' "$unit")
    env -i HOME="$HOME" CONTAINER=1 MESHD_TEST_TIMINGS="$MESHD_TEST_TIMINGS" $environment \\
        $exec_start </dev/null >>"$HOME/service.log" 2>&1 &
    ;;
"--user disable --now meshd.service")
    pid=$(cat "$MESHD_HOME/daemon/meshd.pid" 2>/dev/null) && kill "$pid"
    ;;
esac
exit 0
'''


def clean_env(**extra):
    """os.environ without PYTHONPATH, meshd's variables, and CI or container markers."""
    drop = set(container.CI_VARIABLES) | {'PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP',
                                          'KUBERNETES_SERVICE_HOST', 'CONTAINER'}
    env = {key: value for key, value in os.environ.items()
           if key not in drop and not key.startswith('MESHD_')}
    env.update(extra)
    return env


def build_single_file(output):
    result = subprocess.run([sys.executable, BUILDER, '--output', output], capture_output=True,
                            text=True, timeout=DEADLINE, cwd=ROOT)
    if result.returncode != 0:
        raise AssertionError('build_single_file failed: %s' % result.stderr)
    with open(output, 'rb') as handle:
        return handle.read()



def source_names():
    names = set()
    for package in PACKAGES:
        for directory, subdirs, files in os.walk(os.path.join(ROOT, package)):
            subdirs[:] = [d for d in subdirs if d != '__pycache__']
            names.update(os.path.relpath(os.path.join(directory, name), ROOT)
                         for name in files if name.endswith('.py'))
    return names


class SingleFileTest(unittest.TestCase):
    """dist/meshd.py: one deterministic, self-contained file that runs from any folder."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = short_tempdir()
        cls.archive = os.path.join(cls.tmp, 'meshd.py')
        cls.data = build_single_file(cls.archive)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, True)

    def setUp(self):
        self.bare = short_tempdir()      # an empty working directory: nothing to import from
        self.addCleanup(shutil.rmtree, self.bare, True)

    def run_file(self, *args, env=None, timeout=DEADLINE):
        return subprocess.run([sys.executable, self.archive] + list(args), capture_output=True,
                              text=True, cwd=self.bare, env=env or clean_env(), timeout=timeout)

    def popen_file(self, *args, env, name):
        out = open(os.path.join(self.bare, '%s.log' % name), 'wb')
        self.addCleanup(out.close)
        proc = subprocess.Popen([sys.executable, self.archive] + list(args), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.bare, env=env)

        def kill():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.addCleanup(kill)
        return proc

    def output_of(self, name):
        with open(os.path.join(self.bare, '%s.log' % name), 'r', errors='replace') as handle:
            return handle.read()

    def test_file_is_an_executable_zipapp_of_the_sources(self):
        mode = os.stat(self.archive).st_mode
        self.assertEqual(stat.S_IMODE(mode), 0o755)
        self.assertTrue(self.data.startswith(b'#!/usr/bin/env python3\n'))
        with zipfile.ZipFile(self.archive) as archive:
            infos = archive.infolist()
        names = [info.filename for info in infos]
        self.assertEqual(names, sorted(names))
        self.assertEqual(set(names), source_names() | {'__main__.py'})
        self.assertFalse([n for n in names if '__pycache__' in n or not n.endswith('.py')])
        self.assertEqual({info.date_time for info in infos}, {(1980, 1, 1, 0, 0, 0)})

    def test_two_builds_are_identical(self):
        again = build_single_file(os.path.join(self.bare, 'again.py'))
        self.assertEqual(again, self.data)

    def test_packages_are_imported_from_the_file(self):
        """Running the file puts it first on sys.path; the checkout must not be what runs."""
        probe = ('import sys; sys.path.insert(0, sys.argv[1]); import meshd.cli, rpc.client, '
                 'storage.models; print("\\n".join(m.__file__ for m in (meshd.cli, rpc.client, '
                 'storage.models)))')
        result = subprocess.run([sys.executable, '-c', probe, self.archive], capture_output=True,
                                text=True, cwd=self.bare, env=clean_env(), timeout=DEADLINE)
        self.assertEqual(result.returncode, 0, result.stderr)
        for path in result.stdout.split():
            self.assertTrue(path.startswith(self.archive + os.sep), path)

    def test_version_from_a_bare_folder(self):
        result = self.run_file('--version')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), 'meshd %s' % __version__)

    def test_daemon_up_and_call_from_a_bare_folder(self):
        home = short_tempdir()
        self.addCleanup(shutil.rmtree, home, True)
        env = clean_env(MESHD_HOME=home, MESHD_TEST_TIMINGS=json.dumps(TEST_TIMINGS))
        daemon = self.popen_file('daemon', 'up', '--foreground', '--no-tcp', env=env,
                                 name='daemon')
        socket_path = os.path.join(home, 'daemon', 'meshd.sock')

        def answers():
            if daemon.poll() is not None:
                raise AssertionError('daemon exited with %s: %s'
                                     % (daemon.returncode, self.output_of('daemon')))
            try:
                with RpcClient(socket_path=socket_path, timeout=2.0) as client:
                    return client.call('daemon.version')
            except (RpcConnectionError, RpcCallError, ValueError):
                return None
        wait_for(answers, what='the single-file daemon to answer')
        result = self.run_file('call', 'daemon.version', env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)['daemon_version'], __version__)
        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(timeout=DEADLINE), 0, self.output_of('daemon'))

    def test_broker_and_broker_admin_from_a_bare_folder(self):
        port = free_port()
        db = os.path.join(self.bare, 'broker.db')
        env = clean_env(MESHD_HOME=os.path.join(self.bare, 'home'))
        broker = self.popen_file('broker', '--listen', '127.0.0.1:%d' % port, '--db', db,
                                 env=env, name='broker')

        def listens():
            if broker.poll() is not None:
                raise AssertionError('broker exited with %s: %s'
                                     % (broker.returncode, self.output_of('broker')))
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(listens, what='the single-file broker to listen')
        result = self.run_file('broker-admin', 'create-mesh', '--name', 'packaging', '--db', db,
                               env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)['slug'], 'packaging')
        broker.send_signal(signal.SIGTERM)
        self.assertEqual(broker.wait(timeout=DEADLINE), 0, self.output_of('broker'))

    def assert_missing_dependency(self, module, debian, pypi):
        result = subprocess.run(
            [sys.executable, '-c', MISSING_RUNNER, module, self.archive, '--version'],
            capture_output=True, text=True, cwd=self.bare, env=clean_env(), timeout=DEADLINE)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, '')
        self.assertEqual(result.stderr.splitlines(), [
            "meshd: missing dependency %r (Debian: apt install %s; PyPI: pip install %s)"
            % (module, debian, pypi)])

    def test_a_missing_dependency_is_named_in_one_line(self):
        self.assert_missing_dependency('nacl', 'python3-nacl', 'PyNaCl')

    def test_a_missing_gevent_is_named_in_one_line(self):
        self.assert_missing_dependency('gevent', 'python3-gevent', 'gevent')

    def test_a_missing_websocket_client_is_named_in_one_line(self):
        self.assert_missing_dependency('websocket', 'python3-websocket', 'websocket-client')


class InstallServiceTest(MeshdTestCase):
    """`meshd daemon install-service` with a temporary $HOME and a stand-in systemctl."""

    command = [sys.executable, ENTRY, 'daemon', 'install-service']

    def setUp(self):
        super().setUp()
        self.user_home = short_tempdir()
        self.addCleanup(shutil.rmtree, self.user_home, True)
        bin_dir = os.path.join(self.user_home, 'bin')
        os.mkdir(bin_dir)
        fake = os.path.join(bin_dir, 'systemctl')
        with open(fake, 'w') as handle:
            handle.write(FAKE_SYSTEMCTL)
        os.chmod(fake, 0o755)
        self.bin_dir = bin_dir
        self.systemctl_log = os.path.join(self.user_home, 'systemctl.log')
        self.unit = os.path.join(self.user_home, '.config', 'systemd', 'user', 'meshd.service')

    def install(self, *args, **extra_env):
        env = clean_env(HOME=self.user_home, MESHD_HOME=self.home, PYTHONPATH=ROOT,
                        PATH=self.bin_dir + os.pathsep + os.environ.get('PATH', ''),
                        SYSTEMCTL_LOG=self.systemctl_log,
                        MESHD_TEST_TIMINGS=json.dumps(TEST_TIMINGS), **extra_env)
        return subprocess.run(self.command + list(args), capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=DEADLINE * 2)

    def systemctl_calls(self):
        try:
            with open(self.systemctl_log) as handle:
                return handle.read().splitlines()
        except FileNotFoundError:
            return []

    def test_refused_on_a_ci_host_without_force(self):
        result = self.install(CI='true')
        self.assertEqual(result.returncode, 1)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn('refused', lines[0])
        self.assertIn('CI', lines[0])
        self.assertIn('--force', lines[0])
        self.assertFalse(os.path.exists(self.unit))
        self.assertEqual(self.systemctl_calls(), [])

    def test_refused_in_a_container_without_force(self):
        result = self.install(CONTAINER='1')
        self.assertEqual(result.returncode, 1)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn('container', lines[0])
        self.assertIn('--force', lines[0])
        self.assertFalse(os.path.exists(self.unit))

    def test_force_writes_the_unit(self):
        result = self.install('--force', CI='true')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('installed linux service unit: %s' % self.unit, result.stdout)
        self.assertIn(service.BOOT_COMMAND, result.stdout)
        self.assertEqual(stat.S_IMODE(os.stat(self.unit).st_mode), 0o644)
        with open(self.unit) as handle:
            lines = handle.read().splitlines()
        self.assertIn('Type=notify', lines)
        self.assertIn('Restart=on-failure', lines)
        self.assertIn('RestartPreventExitStatus=2 4', lines)
        self.assertIn('ExecReload=/bin/kill -HUP $MAINPID', lines)
        self.assertIn('Environment=PYTHONNOUSERSITE=1', lines)
        self.assertIn('Environment=MESHD_HOME=%s' % self.home, lines)
        self.assertIn('WantedBy=default.target', lines)
        exec_start = [line for line in lines if line.startswith('ExecStart=')]
        self.assertEqual(exec_start, ['ExecStart=%s %s daemon up --foreground'
                                      % (sys.executable, ENTRY)])
        self.assertTrue(os.path.isabs(sys.executable))
        self.assertEqual(self.systemctl_calls(), [], 'without --now systemctl is not run')

    def test_json_output(self):
        result = self.install('--force', '--json')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), {
            'ok': True, 'platform': 'linux', 'unitPath': self.unit,
            'bootCommand': service.BOOT_COMMAND})

    def test_now_starts_the_unit_and_uninstall_removes_it(self):
        result = self.install('--force', '--now')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.systemctl_calls(), ['--user stop meshd.service',
                                                  '--user daemon-reload',
                                                  '--user enable --now meshd.service'])
        self.assertIn('daemon running under systemd', result.stdout)
        self.assertIn('no mesh joined yet', result.stdout)
        # The stand-in ran the unit's ExecStart in a clean environment: the daemon answers.
        socket_path = os.path.join(self.home, 'daemon', 'meshd.sock')
        with RpcClient(socket_path=socket_path, timeout=5.0) as client:
            pid = client.call('daemon.health')['pid']
        self.addCleanup(self._kill, pid)

        result = self.install('--uninstall')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), 'removed: %s' % self.unit)
        self.assertFalse(os.path.exists(self.unit))
        self.assertEqual(self.systemctl_calls()[3:], ['--user disable --now meshd.service',
                                                      '--user daemon-reload'])
        wait_for(lambda: not psutil.pid_exists(pid) or
                 psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                 what='the unit daemon to stop')

    @staticmethod
    def _kill(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

    def test_uninstall_without_a_unit(self):
        result = self.install('--uninstall')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), 'no service unit installed')
        self.assertEqual(self.systemctl_calls(), [])


class UnitTextTest(unittest.TestCase):
    """The unit itself, and where its ExecStart points."""

    def test_the_debian_package_ships_the_same_unit(self):
        with open(PACKAGED_USER_UNIT) as handle:
            packaged = handle.read()
        rendered = service.render_unit(['/usr/bin/meshd'])
        self.assertEqual(packaged[packaged.index('[Unit]'):], rendered[rendered.index('[Unit]'):])

    def test_exec_start_quotes_spaces_and_escapes_specifiers(self):
        text = service.render_unit(['/opt/my python/bin/python3', '/srv/100%/meshd.py'],
                                   meshd_home='/home/a b/.meshd')
        self.assertIn('ExecStart="/opt/my python/bin/python3" /srv/100%%/meshd.py '
                      'daemon up --foreground', text)
        self.assertIn('Environment="MESHD_HOME=/home/a b/.meshd"', text)

    def test_entry_of_a_checkout_a_single_file_and_a_console_script(self):
        tmp = short_tempdir()
        self.addCleanup(shutil.rmtree, tmp, True)
        self.assertEqual(control.entry_command('/usr/bin/python3'), ['/usr/bin/python3', ENTRY])
        archive = os.path.join(tmp, 'meshd.py')
        with zipfile.ZipFile(archive, 'w') as handle:
            handle.writestr('meshd/__init__.py', '')
        self.assertEqual(control.entry_command('/usr/bin/python3',
                                               os.path.join(archive, 'meshd', '__init__.py')),
                         ['/usr/bin/python3', archive])
        script = os.path.join(tmp, 'bin-meshd')
        with open(script, 'w') as handle:
            handle.write('#!/usr/bin/python3\n')
        site = os.path.join(tmp, 'site-packages', 'meshd', '__init__.py')
        self.assertEqual(control.entry_command('/venv/bin/python', site, script),
                         ['/venv/bin/python', script])


if __name__ == '__main__':
    unittest.main()
