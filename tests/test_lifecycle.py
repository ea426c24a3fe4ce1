"""Daemon lifecycle: singleton, stale pid file, fingerprint, modes, signals, config, reload."""
import json
import os
import signal
import stat
import subprocess
import sys

from tests.base import DEADLINE, ENTRY, MeshdTestCase, make_mesh, meshd_env, wait_for


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class SingletonTest(MeshdTestCase):

    def test_two_concurrent_starts_run_exactly_one_daemon(self):
        env = meshd_env(self.home)
        procs = [subprocess.Popen([sys.executable, ENTRY, 'daemon', 'up', '--foreground'],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                  text=True)
                 for _ in range(2)]
        for proc in procs:
            self.addCleanup(lambda p=proc: (p.poll() is None and p.kill(), p.wait()))
        # Exactly one exits 1 with "already running"; the other serves.
        loser = wait_for(lambda: [p for p in procs if p.poll() is not None],
                         what='one of the two daemons to give up')[0]
        self.assertEqual(loser.returncode, 1)
        self.assertIn('daemon already running (pid', loser.stderr.read())
        winner = [p for p in procs if p is not loser][0]
        self.assertIsNone(winner.poll())
        winner.send_signal(signal.SIGTERM)
        self.assertEqual(winner.wait(timeout=DEADLINE), 0)

    def test_stale_pid_file_naming_a_live_unrelated_process_does_not_block_start(self):
        daemon_dir = os.path.join(self.home, 'daemon')
        os.makedirs(daemon_dir, mode=0o700)
        with open(os.path.join(daemon_dir, 'meshd.pid'), 'w') as handle:
            handle.write(str(os.getpid()))  # this test runner: alive, not a daemon
        daemon = self.start_daemon()
        self.assertIn('recovered stale pid file; starting fresh', daemon.stderr())
        with open(os.path.join(daemon_dir, 'meshd.pid')) as handle:
            self.assertEqual(handle.read(), str(daemon.pid))
        self.assertEqual(daemon.stop(), 0)
        self.assertFalse(os.path.exists(os.path.join(daemon_dir, 'meshd.pid')))

    def test_a_start_that_cannot_bind_leaves_the_live_socket_alone(self):
        """A second daemon that failed to bind unlinked the first daemon's socket on its way
        out, leaving the first alive but unreachable."""
        first = self.start_daemon()
        os.unlink(os.path.join(self.home, 'daemon', 'meshd.pid'))  # the lock file is gone
        second = self.start_daemon(wait=False)
        self.assertEqual(second.wait_exit(), 1)
        self.assertIn('ipc listen failed', second.stderr())
        self.assertTrue(os.path.exists(first.socket))
        self.assertTrue(first.call('daemon.health')['ok'])

    def test_sigterm_exits_zero_after_daemon_shutdown_and_removes_socket(self):
        daemon = self.start_daemon()
        self.assertEqual(daemon.stop(signal.SIGTERM), 0)
        lines = [line['msg'] for line in daemon.log_lines()]
        self.assertIn('daemon_started', lines)
        self.assertIn('daemon_shutdown', lines)
        shutdown = [l for l in daemon.log_lines() if l['msg'] == 'daemon_shutdown'][0]
        self.assertEqual(shutdown['signal'], 'SIGTERM')
        self.assertEqual(list(shutdown)[-1], 'ts')
        self.assertFalse(os.path.exists(daemon.socket))

    def test_sigint_is_a_clean_stop_too(self):
        daemon = self.start_daemon()
        self.assertEqual(daemon.stop(signal.SIGINT), 0)

    def test_second_signal_during_shutdown_exits_at_once_with_status_1(self):
        daemon = self.start_daemon()
        # Stopped, the daemon cannot start its shutdown between the two signals; on SIGCONT
        # it sees both (two different signals, so they do not coalesce).
        daemon.proc.send_signal(signal.SIGSTOP)
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.send_signal(signal.SIGINT)
        daemon.proc.send_signal(signal.SIGCONT)
        self.assertEqual(daemon.wait_exit(), 1)


class FingerprintTest(MeshdTestCase):

    def _tamper(self):
        path = os.path.join(self.home, 'daemon', 'host_fingerprint.json')
        with open(path) as handle:
            record = json.load(handle)
        record['fingerprint'] = '0' * 64
        record['host_id'] = 'linux:another-machine'
        with open(path, 'w') as handle:
            json.dump(record, handle)

    def test_first_run_writes_the_record_and_logs_it(self):
        daemon = self.start_daemon()
        line = daemon.wait_for_log('host_fingerprint_written')[0]
        self.assertEqual(len(line['fingerprint_prefix']), 16)
        self.assertNotIn('level', line)
        record = json.load(open(os.path.join(self.home, 'daemon', 'host_fingerprint.json')))
        self.assertEqual(record['schema_version'], 2)
        self.assertTrue(record['fingerprint'].startswith(line['fingerprint_prefix']))

    def test_mismatch_refuses_with_exit_4_and_accept_host_recovers(self):
        self.start_daemon().stop()
        self._tamper()
        daemon = self.start_daemon(wait=False)
        self.assertEqual(daemon.wait_exit(), 4)
        self.assertIn('host_fingerprint mismatch', daemon.stderr())
        self.assertIn('meshd daemon accept-host', daemon.stderr())
        self.assertNotIn('Traceback', daemon.stderr())
        self.assertFalse(os.path.exists(os.path.join(self.home, 'daemon', 'meshd.pid')))
        result = self.run_cli('daemon', 'accept-host')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('host fingerprint accepted:', result.stdout)
        self.assertEqual(self.start_daemon().stop(), 0)

    def test_warn_and_allow_policies_continue(self):
        self.start_daemon().stop()
        self._tamper()
        daemon = self.start_daemon(args=['--clone-policy', 'warn'])
        self.assertIn('continuing per [clone] policy=warn', daemon.stderr())
        daemon.stop()
        self.write_config([], clone_policy='allow')
        daemon = self.start_daemon()  # the config key sets the policy too
        daemon.stop()


class ModesTest(MeshdTestCase):

    def test_secret_files_and_dirs_have_private_modes_under_umask_000(self):
        self.write_config([make_mesh('alpha')])
        os.chmod(self.home, 0o755)  # a home that exists wider is narrowed to 0700
        self.start_daemon(preexec_fn=lambda: os.umask(0))
        daemon_dir = os.path.join(self.home, 'daemon')
        self.assertEqual(_mode(self.home), 0o700)
        self.assertEqual(_mode(daemon_dir), 0o700)
        for name in ('meshd.pid', 'meshd.sock', 'local-token', 'meshd.db',
                     'host_fingerprint.json'):
            self.assertEqual(_mode(os.path.join(daemon_dir, name)), 0o600, name)
        for name in ('meshd.db-wal', 'meshd.db-shm'):
            path = os.path.join(daemon_dir, name)
            if os.path.exists(path):
                self.assertEqual(_mode(path), 0o600, name)
        self.assertEqual(_mode(os.path.join(self.home, 'config.json')), 0o600)
        token = open(os.path.join(daemon_dir, 'local-token')).read()
        self.assertRegex(token, r'^[A-Za-z0-9_-]{43}\n$')


class ConfigTest(MeshdTestCase):

    def test_unparsable_config_is_one_line_and_exit_2(self):
        with open(os.path.join(self.home, 'config.json'), 'w') as handle:
            handle.write('{"meshes": [')
        daemon = self.start_daemon(wait=False)
        self.assertEqual(daemon.wait_exit(), 2)
        errors = [line for line in daemon.stderr().splitlines() if line.strip()]
        self.assertEqual(len(errors), 1, errors)
        self.assertTrue(errors[0].startswith('config unreadable: '), errors[0])
        self.assertFalse(os.path.exists(os.path.join(self.home, 'daemon', 'meshd.pid')))

    def test_no_mesh_joined_still_serves(self):
        daemon = self.start_daemon()
        daemon.wait_for_log('no_mesh_joined')
        started = daemon.wait_for_log('daemon_started')[0]
        self.assertEqual(started['meshes'], [])
        self.assertTrue(daemon.call('daemon.health')['ok'])

    def test_reload_attaches_and_detaches_meshes_and_sighup_does_the_same(self):
        self.write_config([make_mesh('alpha')])
        daemon = self.start_daemon()
        self.write_config([make_mesh('beta')] + [
            json.load(open(os.path.join(self.home, 'config.json')))['meshes'][0]])
        result = daemon.call('daemon.reload')
        self.assertEqual(result['attached'], ['beta'])
        self.assertEqual(result['detached'], [])
        self.assertEqual(result['meshes'], ['alpha', 'beta'])
        self.write_config([make_mesh('gamma')])
        daemon.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: [l for l in daemon.log_lines()
                                 if l['msg'] == 'config_reloaded' and 'gamma' in l['attached']],
                        what='config_reloaded after SIGHUP')[0]
        self.assertEqual(sorted(line['detached']), ['alpha', 'beta'])

    def test_reload_of_unparsable_config_keeps_running_meshes(self):
        self.write_config([make_mesh('alpha')])
        daemon = self.start_daemon()
        with open(os.path.join(self.home, 'config.json'), 'w') as handle:
            handle.write('not json')
        with daemon.client() as client:
            answer = client.request('daemon.reload')
        self.assertEqual(answer['error']['data']['code'], 'config_unreadable')
        self.assertIn('config unreadable: ', answer['error']['message'])
        daemon.wait_for_log('config_reload_failed')
        self.write_config([make_mesh('alpha')])
        # alpha is still attached: its entry changed, so it is re-attached, not newly added.
        self.assertEqual(daemon.call('daemon.reload')['meshes'], ['alpha'])

    def test_tcp_and_no_tcp_together_is_a_usage_error(self):
        result = self.run_cli('daemon', 'up', '--foreground', '--tcp', '--no-tcp')
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1)
