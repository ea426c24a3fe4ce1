"""The CLI as users run it: detached start and stop, status, raw calls, listings, errors."""
import json
import os
import secrets
import uuid

from meshd import __version__
from storage.migrations import HEAD
from tests.base import MeshdTestCase, make_mesh, wait_for


class DetachedDaemonTest(MeshdTestCase):

    def tearDown(self):
        self.run_cli('daemon', 'down')  # never leave a detached daemon behind

    def test_up_detaches_and_returns_once_the_socket_answers_then_down_stops_it(self):
        result = self.run_cli('daemon', 'up', '--json')
        self.assertEqual(result.returncode, 0, result.stderr)
        started = json.loads(result.stdout)
        self.assertTrue(started['ok'])
        # No waiting: `up` returned only once the daemon answered.
        health = self.run_cli('call', 'daemon.health')
        self.assertEqual(health.returncode, 0, health.stderr)
        self.assertEqual(json.loads(health.stdout)['pid'], started['pid'])
        status = self.run_cli('daemon', 'status')
        self.assertEqual(status.returncode, 0)
        self.assertIn('daemon: running (pid %d)' % started['pid'], status.stdout)
        self.assertIn('daemon %s (ipc v1, schema %d)' % (__version__, HEAD),
                      status.stdout)
        again = self.run_cli('daemon', 'up')
        self.assertEqual(again.returncode, 0)
        self.assertIn('already running', again.stdout)
        down = self.run_cli('daemon', 'down')
        self.assertEqual(down.returncode, 0, down.stderr)
        self.assertIn('daemon: stopped (was pid %d)' % started['pid'], down.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.home, 'daemon', 'meshd.pid')))
        log = open(os.path.join(self.home, 'daemon', 'daemon.log')).read()
        self.assertIn('"msg":"daemon_shutdown"', log)

    def test_status_and_down_when_not_running(self):
        status = self.run_cli('daemon', 'status', '--json')
        self.assertEqual(status.returncode, 1)
        self.assertEqual(json.loads(status.stdout), {'running': False})
        down = self.run_cli('daemon', 'down')
        self.assertEqual((down.returncode, down.stdout.strip()), (0, 'daemon: not running'))

    def test_up_reports_a_daemon_that_refuses_to_start(self):
        with open(os.path.join(self.home, 'config.json'), 'w') as handle:
            handle.write('{broken')
        result = self.run_cli('daemon', 'up')
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn('config unreadable', result.stderr)


class AutoStartTest(MeshdTestCase):

    def tearDown(self):
        self.run_cli('daemon', 'down')

    def test_a_verb_starts_the_daemon_once_and_later_verbs_use_it(self):
        first = self.run_cli('inbox', '--json')
        self.assertEqual(first.returncode, 0, first.stderr)
        self.assertIn('[meshd] info daemon started automatically', first.stderr)
        self.assertEqual(json.loads(first.stdout), [])
        second = self.run_cli('call', 'daemon.version')
        self.assertEqual(second.returncode, 0, second.stderr)
        self.assertNotIn('started automatically', second.stderr)
        log = open(os.path.join(self.home, 'daemon', 'daemon.log')).read()
        self.assertEqual(log.count('"msg":"daemon_started"'), 1)

    def test_call_with_no_spawn_does_not_start_it(self):
        result = self.run_cli('call', '--no-spawn', 'daemon.version')
        self.assertEqual(result.returncode, 1)
        self.assertIn('not running (auto-start is off)', result.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.home, 'daemon', 'meshd.sock')))


class CallTest(MeshdTestCase):

    def setUp(self):
        super().setUp()
        self.write_config([make_mesh('alpha')])
        self.daemon = self.start_daemon()

    def test_version_flag(self):
        result = self.run_cli('--version')
        self.assertEqual(result.returncode, 0)
        self.assertIn(__version__, result.stdout)

    def test_call_prints_the_result_as_json(self):
        result = self.run_cli('call', 'daemon.version')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)['ipc_api'], 'v1')

    def test_call_errors_are_printed_on_stderr_with_exit_1(self):
        result = self.run_cli('call', 'no.such.method')
        self.assertEqual(result.returncode, 1)
        self.assertEqual(json.loads(result.stderr)['data']['code'], 'method_not_found')
        for bad in ('[1, 2]', 'not json'):
            result = self.run_cli('call', 'daemon.health', bad)
            self.assertEqual(result.returncode, 2)
            self.assertEqual(len(result.stderr.strip().splitlines()), 1)
            self.assertNotIn('Traceback', result.stderr)

    def test_call_attaches_the_session_named_by_the_token_file(self):
        token = secrets.token_hex(32)
        self.daemon.call('sessions.register', {
            'token': token, 'session_id': str(uuid.uuid4()), 'mesh': 'alpha',
            'display_name': 'cli-agent', 'pid': os.getpid()})
        token_file = os.path.join(self.home, 'session-token')
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, token.encode())
        os.close(fd)
        result = self.run_cli('call', 'sessions.me',
                              env={'MESHD_SESSION_TOKEN_FILE': token_file})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)['session']['display_name'], 'cli-agent')
        result = self.run_cli('call', 'sessions.me', '--no-session',
                              env={'MESHD_SESSION_TOKEN_FILE': token_file})
        self.assertEqual(result.returncode, 1)

    def test_listing_verbs_print_json(self):
        for verb, expected in (('inbox', []), ('outbox', []), ('sessions', [])):
            result = self.run_cli(verb, '--json')
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(json.loads(result.stdout), expected)
        self.assertEqual(self.run_cli('outbox').stdout.strip(), '(empty)')

    def test_outbox_requeue_of_an_unknown_row_is_one_line_and_exit_1(self):
        result = self.run_cli('outbox', 'requeue', 'nope')
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.strip(),
                         'requeue failed (conflict): row not found, already aborted, or already done')
        self.assertEqual(self.run_cli('outbox', 'requeue').returncode, 2)

    def test_verbs_without_a_daemon_say_so_in_one_line_when_auto_start_is_off(self):
        self.daemon.stop()
        wait_for(lambda: not os.path.exists(self.daemon.socket), what='socket removal')
        for args in (('inbox',), ('call', 'daemon.health'), ('sessions',)):
            result = self.run_cli(*args, env={'MESHD_NO_AUTOSPAWN': '1'})
            self.assertEqual(result.returncode, 1)
            self.assertIn('daemon not reachable', result.stderr)
            self.assertEqual(len(result.stderr.strip().splitlines()), 1)
