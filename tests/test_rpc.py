"""The daemon's local JSON-RPC API: framing, batches, errors and auth (spec/daemon.md §8.1).

Against a real daemon process. Framing is checked on raw sockets, byte for byte, never
through rpc.client, which would hide what the daemon actually wrote.
"""
import json
import os
import pwd
import socket
import stat
import subprocess

from meshd import api, container
from meshd.api.daemon_methods import DaemonMethods
from meshd.api.events import EventMethods
from meshd.bus import EventBus
from rpc.protocol import MAX_LINE
from rpc.methods import MethodTable
from rpc.server import RpcServer
from storage import migrate
from storage.migrations import MIGRATIONS
from storage.models import database as models_database
from storage.store import Store

from tests.base import (DEADLINE, MeshdTestCase, Raw, line, notification, request,
                        wait_for)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
AUTH_ERROR = -32001
SESSION_MODES = ('none', 'optional', 'required')


class RpcTestCase(MeshdTestCase):
    """Helpers shared by the daemon-backed tests below."""

    def connect(self, daemon=None):
        conn = Raw.unix((daemon or self.daemon).socket)
        self.addCleanup(conn.close)
        return conn

    def connect_tcp(self, address):
        conn = Raw.tcp(address)
        self.addCleanup(conn.close)
        return conn

    def assertResult(self, answer, request_id):
        self.assertIsInstance(answer, dict, answer)
        self.assertEqual(answer.get('jsonrpc'), '2.0', answer)
        self.assertEqual(answer.get('id'), request_id, answer)
        self.assertNotIn('error', answer, answer)
        self.assertIn('result', answer, answer)
        return answer['result']

    def assertError(self, answer, request_id, code, slug, message=None):
        self.assertIsInstance(answer, dict, answer)
        self.assertEqual(answer.get('jsonrpc'), '2.0', answer)
        self.assertIn('id', answer, answer)
        self.assertEqual(answer['id'], request_id, answer)
        self.assertNotIn('result', answer, answer)
        error = answer.get('error')
        self.assertIsInstance(error, dict, answer)
        self.assertEqual(error.get('code'), code, answer)
        self.assertIsInstance(error.get('message'), str, answer)
        self.assertIsInstance(error.get('data'), dict, answer)
        self.assertEqual(error['data'].get('code'), slug, answer)
        if message is not None:
            self.assertEqual(error['message'], message, answer)
        return error

    def call_on(self, conn, request_id, method, params=None):
        conn.send_json(request(request_id, method, params))
        return conn.read_json()


class FramingTest(RpcTestCase):
    """Newline-delimited JSON-RPC 2.0 on the Unix socket."""

    def setUp(self):
        super().setUp()
        self.daemon = self.start_daemon()

    def test_bad_json_answers_parse_error_and_connection_stays_usable(self):
        conn = self.connect()
        conn.send(b'{"jsonrpc":"2.0","id":1,"method":\n')
        self.assertError(conn.read_json(), None, PARSE_ERROR, 'parse_error')
        conn.send(b'not json at all\n')
        self.assertError(conn.read_json(), None, PARSE_ERROR, 'parse_error')
        result = self.assertResult(self.call_on(conn, 2, 'daemon.health'), 2)
        self.assertTrue(result['ok'])

    def test_absurdly_nested_json_is_a_parse_error(self):
        """A line of 200 000 '[' raised RecursionError: no answer and a raw traceback."""
        conn = self.connect()
        conn.send(b'[' * 200000 + b'\n')
        self.assertError(conn.read_json(), None, PARSE_ERROR, 'parse_error')
        self.assertResult(self.call_on(conn, 2, 'daemon.version'), 2)

    def test_line_over_one_mib_answers_payload_too_large_and_closes(self):
        conn = self.connect()
        prefix = b'{"jsonrpc":"2.0","id":1,"method":"daemon.health","params":{"pad":"'
        suffix = b'"}}\n'
        # The shortest line over the limit: MAX_LINE + 1 bytes before its newline.
        body = prefix + b'x' * (MAX_LINE + 2 - len(prefix) - len(suffix)) + suffix
        self.assertEqual(len(body), MAX_LINE + 2)
        conn.send(body)
        self.assertError(conn.read_json(), None, INVALID_REQUEST, 'payload_too_large')
        self.assertEqual(conn.read_to_end(), b'')
        # The daemon itself is unharmed.
        self.assertTrue(self.daemon.call('daemon.health')['ok'])

    def test_half_close_answers_every_request_already_read(self):
        conn = self.connect()
        conn.send(line(request(1, 'daemon.version')) + line(request(2, 'rpc.list'))
                  + line(request(3, 'daemon.health')))
        conn.sock.shutdown(socket.SHUT_WR)
        answers = [json.loads(text) for text in conn.read_to_end().splitlines()]
        self.assertEqual([answer.get('id') for answer in answers], [1, 2, 3])
        for answer in answers:
            self.assertIn('result', answer, answer)

    def test_events_subscribe_keeps_streaming_after_half_close(self):
        conn = self.connect()
        result = self.assertResult(self.call_on(conn, 1, 'events.subscribe'), 1)
        self.assertEqual(set(result), {'epoch', 'seq', 'replayed', 'resync'})
        conn.sock.shutdown(socket.SHUT_WR)
        self.daemon.call('sessions.register', {
            'token': 'cd' * 32, 'session_id': 'streamed', 'mesh': 'm',
            'display_name': 'watcher', 'pid': os.getpid()})
        while True:
            message = conn.read_json()
            self.assertNotIn('id', message, message)
            if message.get('method') == 'event':
                break
            self.assertEqual(message.get('method'), 'keepalive', message)
        params = message['params']
        self.assertEqual(params['epoch'], result['epoch'])
        self.assertGreater(params['seq'], result['seq'])
        self.assertEqual(params['kind'], 'system')
        self.assertEqual(params['data'].get('session_id'), 'streamed', params)

    def test_auth_on_the_unix_socket_is_checked_but_not_required(self):
        with open(os.path.join(self.home, 'daemon', 'local-token')) as handle:
            token = handle.read().strip()
        conn = self.connect()
        self.assertResult(self.call_on(conn, 1, 'daemon.version'), 1)
        self.assertError(self.call_on(conn, 2, 'auth', {'token': 'wrong'}), 2,
                         AUTH_ERROR, 'invalid_token')
        lines = self.daemon.wait_for_log('ipc_auth_failed')
        self.assertEqual(lines[0].get('transport'), 'uds', lines[0])
        self.assertResult(self.call_on(conn, 3, 'daemon.version'), 3)
        self.assertEqual(self.assertResult(self.call_on(conn, 4, 'auth', {'token': token}), 4),
                         {'ok': True})

    def test_line_of_exactly_one_mib_is_served(self):
        conn = self.connect()
        head = line(request(7, 'daemon.version'))[:-1]
        conn.send(head + b' ' * (MAX_LINE - len(head) - 1) + b'\n')  # MAX_LINE bytes with '\n'
        self.assertResult(conn.read_json(), 7)
        self.assertResult(self.call_on(conn, 8, 'daemon.health'), 8)

    def test_batch_answers_one_line_in_order_without_notifications(self):
        conn = self.connect()
        conn.send_json([request('a', 'daemon.version'),
                        notification('daemon.health'),
                        request('b', 'no.such.method'),
                        notification('no.such.method'),
                        request(3, 'daemon.health')])
        answers = conn.read_json()
        self.assertIsInstance(answers, list, answers)
        self.assertEqual([answer.get('id') for answer in answers], ['a', 'b', 3])
        self.assertIn('daemon_version', self.assertResult(answers[0], 'a'))
        self.assertError(answers[1], 'b', METHOD_NOT_FOUND, 'method_not_found')
        self.assertTrue(self.assertResult(answers[2], 3)['ok'])
        # The whole batch was one line: the next line answers the next request.
        self.assertResult(self.call_on(conn, 4, 'daemon.version'), 4)

    def test_all_notification_batch_produces_no_line(self):
        conn = self.connect()
        conn.send_json([notification('daemon.health'), notification('no.such.method'),
                        notification('auth', {})])
        answer = self.call_on(conn, 'after', 'daemon.version')
        self.assertResult(answer, 'after')

    def test_empty_batch_is_invalid_request(self):
        conn = self.connect()
        conn.send(b'[]\n')
        answer = conn.read_json()
        self.assertIsInstance(answer, dict, 'an empty batch answers one error, not an array')
        self.assertError(answer, None, INVALID_REQUEST, 'invalid_request')
        self.assertResult(self.call_on(conn, 1, 'daemon.version'), 1)

    def test_non_object_batch_entry_is_invalid_request(self):
        conn = self.connect()
        conn.send_json([1, request(2, 'daemon.version')])
        answers = conn.read_json()
        self.assertIsInstance(answers, list, answers)
        self.assertEqual(len(answers), 2, answers)
        self.assertError(answers[0], None, INVALID_REQUEST, 'invalid_request')
        self.assertResult(answers[1], 2)

    def test_events_subscribe_in_batch_is_invalid_request(self):
        conn = self.connect()
        conn.send_json([request(1, 'daemon.version'), request(2, 'events.subscribe')])
        answers = conn.read_json()
        self.assertIsInstance(answers, list, answers)
        self.assertEqual([answer.get('id') for answer in answers], [1, 2])
        self.assertResult(answers[0], 1)
        self.assertError(answers[1], 2, INVALID_REQUEST, 'invalid_request')
        # No stream started: the next line is the next answer, not an event or keepalive.
        self.assertResult(self.call_on(conn, 3, 'daemon.health'), 3)

    def test_notification_gets_no_response_even_for_unknown_method(self):
        conn = self.connect()
        conn.send(line(notification('no.such.method'))
                  + line(notification('daemon.health'))
                  + line(notification('inbox.list', {'limit': 'x'}))
                  + line({'jsonrpc': '1.0', 'method': 'daemon.health'}))
        self.assertResult(self.call_on(conn, 'next', 'daemon.version'), 'next')

    def test_unknown_method_is_method_not_found(self):
        conn = self.connect()
        self.assertError(self.call_on(conn, 5, 'no.such.method'), 5,
                         METHOD_NOT_FOUND, 'method_not_found')
        # Attribute-like names reach nothing either (STYLE.md §4).
        self.assertError(self.call_on(conn, 6, '__init__'), 6,
                         METHOD_NOT_FOUND, 'method_not_found')

    def test_unknown_parameter_is_invalid_params(self):
        conn = self.connect()
        self.assertError(self.call_on(conn, 1, 'inbox.list', {'bogus': 1}), 1,
                         INVALID_PARAMS, 'invalid_params')
        # `from` is the wire name; the Python name behind it is not accepted.
        self.assertError(self.call_on(conn, 2, 'inbox.list', {'sender': 'ab'}), 2,
                         INVALID_PARAMS, 'invalid_params')
        self.assertResult(self.call_on(conn, 3, 'inbox.list', {'from': 'ab'}), 3)

    def test_wrong_parameter_type_is_invalid_params(self):
        conn = self.connect()
        self.assertError(self.call_on(conn, 1, 'inbox.list', {'limit': 'x'}), 1,
                         INVALID_PARAMS, 'invalid_params')
        self.assertError(self.call_on(conn, 2, 'inbox.list', {'unread_only': 'yes'}), 2,
                         INVALID_PARAMS, 'invalid_params')
        self.assertError(self.call_on(conn, 3, 'inbox.list', {'limit': True}), 3,
                         INVALID_PARAMS, 'invalid_params')

    def test_lone_surrogates_are_invalid_params_never_internal(self):
        """Finding 10: a lone surrogate escape in any string parameter answered -32603 and
        logged a traceback (604 of 100,000 fuzzed lines)."""
        conn = self.connect()
        for request_id, (method, params) in enumerate((
                ('inbox.list', {'topic': '\ud800'}),
                ('send', {'to': 'bob', 'message': 'hi \udfff'}),
                ('send', {'to': '*', 'message': 'x', 'meta': {'k': ['\udc00']}}),
                ('sessions.register', {'token': 'ab' * 32, 'session_id': '\ud83d',
                                       'mesh': 'm', 'display_name': 'x', 'pid': 1})), 1):
            self.assertError(self.call_on(conn, request_id, method, params), request_id,
                             INVALID_PARAMS, 'invalid_params')
        # A surrogate in a method name or an id is echoed back as the same JSON escape.
        conn.send(b'{"jsonrpc":"2.0","id":"\\ud800","method":"no.such\\udc01"}\n')
        answer = conn.read_json()
        self.assertEqual((answer['id'], answer['error']['data']['code']),
                         ('\ud800', 'method_not_found'))
        self.assertNotIn('Traceback', self.daemon.stderr())

    def test_missing_required_parameter_is_invalid_params(self):
        conn = self.connect()
        self.assertError(self.call_on(conn, 1, 'auth', {}), 1,
                         INVALID_PARAMS, 'invalid_params', message="missing 'token'")
        self.assertError(self.call_on(conn, 2, 'auth'), 2,
                         INVALID_PARAMS, 'invalid_params', message="missing 'token'")

    def test_positional_params_are_invalid_params(self):
        conn = self.connect()
        self.assertError(self.call_on(conn, 1, 'inbox.list', [10]), 1,
                         INVALID_PARAMS, 'invalid_params')
        self.assertError(self.call_on(conn, 2, 'daemon.health', []), 2,
                         INVALID_PARAMS, 'invalid_params')

    def test_jsonrpc_other_than_2_0_is_invalid_request(self):
        conn = self.connect()
        conn.send_json({'jsonrpc': '1.0', 'id': 1, 'method': 'daemon.health'})
        self.assertError(conn.read_json(), 1, INVALID_REQUEST, 'invalid_request')
        conn.send_json({'id': 2, 'method': 'daemon.health'})
        self.assertError(conn.read_json(), 2, INVALID_REQUEST, 'invalid_request')
        conn.send_json({'jsonrpc': 2.0, 'id': 3, 'method': 'daemon.health'})
        self.assertError(conn.read_json(), 3, INVALID_REQUEST, 'invalid_request')

    def test_params_over_method_limit_is_payload_too_large(self):
        conn = self.connect()
        # outbox.requeue: 4 KiB. Just under answers the method's own error, over answers the limit.
        under = {'id': 'x' * (4 * 1024 - 20)}
        self.assertLessEqual(len(json.dumps(under, separators=(',', ':'))), 4 * 1024)
        error = self.assertError(self.call_on(conn, 1, 'outbox.requeue', under), 1,
                                 -32003, 'conflict')
        self.assertEqual(error['data'].get('reason'), 'requeue_not_allowed')
        over = {'id': 'x' * (4 * 1024 + 10)}
        self.assertError(self.call_on(conn, 2, 'outbox.requeue', over), 2,
                         INVALID_REQUEST, 'payload_too_large')
        # Every other method: 64 KiB.
        self.assertError(self.call_on(conn, 3, 'sessions.deregister', {'token': 'x' * 8000}), 3,
                         INVALID_PARAMS, 'invalid_params')
        self.assertError(self.call_on(conn, 4, 'sessions.deregister',
                                      {'token': 'x' * (64 * 1024 + 10)}), 4,
                         INVALID_REQUEST, 'payload_too_large')
        # The connection stays usable after a params limit (only an over-long line closes it).
        self.assertResult(self.call_on(conn, 5, 'daemon.version'), 5)

    def test_pipelined_requests_are_answered_in_order(self):
        conn = self.connect()
        methods = ['daemon.health', 'rpc.list', 'sessions.list', 'inbox.list', 'outbox.list',
                   'no.such.method', 'daemon.version', 'inbox.flush']
        sent = []
        data = b''
        for index in range(20):
            request_id = 'r%02d' % (20 - index) if index % 2 else index
            sent.append(request_id)
            data += line(request(request_id, methods[index % len(methods)]))
        conn.send(data)
        received = [conn.read_json().get('id') for _ in sent]
        self.assertEqual(received, sent)

    def test_rpc_list_describes_every_method(self):
        conn = self.connect()
        result = self.assertResult(self.call_on(conn, 1, 'rpc.list'), 1)
        methods = result['methods']
        names = [method['name'] for method in methods]
        self.assertEqual(len(names), len(set(names)), 'a method is listed twice')
        for name in ('auth', 'rpc.list', 'session.attach', 'daemon.health', 'events.subscribe',
                     'inbox.list'):
            self.assertIn(name, names)
        for method in methods:
            self.assertEqual(set(method), {'name', 'help', 'params', 'result', 'session'}, method)
            self.assertIsInstance(method['help'], str, method)
            self.assertTrue(method['help'].strip(), 'empty help for %s' % method['name'])
            self.assertNotIn('\n', method['help'], method)
            self.assertIsInstance(method['params'], dict, method)
            self.assertIsInstance(method['result'], str, method)
            self.assertIn(method['session'], SESSION_MODES, method)
        by_name = {method['name']: method for method in methods}
        self.assertIn('from', by_name['inbox.list']['params'])
        self.assertNotIn('sender', by_name['inbox.list']['params'])
        self.assertIn('token', by_name['auth']['params'])
        self.assertIn('token', by_name['session.attach']['params'])
        self.assertEqual(by_name['sessions.me']['session'], 'required')

    def test_every_method_answers_a_socat_one_liner(self):
        names = [method['name'] for method in self.daemon.call('rpc.list')['methods']]
        self.assertIn('events.subscribe', names)
        for number, name in enumerate(names, 1):
            command = ['socat', '-t', '1'] if name == 'events.subscribe' else ['socat']
            command += ['-', 'UNIX-CONNECT:' + self.daemon.socket]
            done = subprocess.run(command, input=line(request(number, name)),
                                  capture_output=True, timeout=DEADLINE)
            self.assertEqual(done.returncode, 0, (name, done.stderr))
            first = done.stdout.split(b'\n', 1)[0]
            self.assertTrue(first, 'no answer to %s (stderr %r)' % (name, done.stderr))
            answer = json.loads(first)
            self.assertEqual(answer.get('jsonrpc'), '2.0', (name, answer))
            self.assertEqual(answer.get('id'), number, (name, answer))
            if 'error' in answer:
                slug = (answer['error'].get('data') or {}).get('code')
                self.assertIsInstance(slug, str, (name, answer))
                self.assertNotIn(slug, ('method_not_found', 'internal'), (name, answer))
            else:
                self.assertIn('result', answer, (name, answer))
        # The daemon survived them all.
        self.assertTrue(self.daemon.call('daemon.health')['ok'])


class DefaultsTest(RpcTestCase):
    """What a daemon started with no options does."""

    def test_tcp_is_off_by_default_in_a_container(self):
        # The default follows container detection (spec §1.4): this host is a container
        # (/.dockerenv exists), and on a host that is not, CONTAINER=1 makes it one.
        env = None if container.in_container() else {'CONTAINER': '1'}
        daemon = self.start_daemon(env=env)
        self.assertIsNone(daemon.call('daemon.health')['tcp'])
        started = daemon.wait_for_log('daemon_started')
        self.assertIsNone(started[0]['tcp'], started[0])

    def test_socket_is_0600_even_under_umask_000(self):
        daemon = self.start_daemon(preexec_fn=lambda: os.umask(0))
        info = os.stat(daemon.socket)
        self.assertTrue(stat.S_ISSOCK(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600, oct(info.st_mode))
        self.assertEqual(info.st_uid, os.getuid())
        token = os.stat(os.path.join(self.home, 'daemon', 'local-token'))
        self.assertEqual(stat.S_IMODE(token.st_mode), 0o600, oct(token.st_mode))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(daemon.socket)).st_mode), 0o700)


class TcpTest(RpcTestCase):
    """The loopback TCP listener: the first call must be `auth` with the local token."""

    def setUp(self):
        super().setUp()
        self.daemon = self.start_daemon(args=['--tcp', '--tcp-port', '0'])
        self.address = self.daemon.call('daemon.health')['tcp']
        self.assertRegex(self.address or '', r'^127\.0\.0\.1:\d+$')
        self.port = int(self.address.rpartition(':')[2])
        self.assertNotEqual(self.port, 0)
        with open(os.path.join(self.home, 'daemon', 'local-token')) as handle:
            self.token = handle.read().strip()
        self.assertTrue(self.token)

    def test_first_call_other_than_auth_is_refused_and_not_run(self):
        conn = self.connect_tcp(self.address)
        params = {'token': 'ab' * 32, 'session_id': 'tcp-session', 'mesh': 'm',
                  'display_name': 'intruder', 'pid': os.getpid()}
        conn.send_json(request(1, 'sessions.register', params))
        self.assertError(conn.read_json(), 1, AUTH_ERROR, 'auth_required')
        self.assertEqual(conn.read_to_end(), b'')
        self.assertEqual(self.daemon.call('sessions.list')['sessions'], [])
        # Control: the same call over the Unix socket does register (so the check above can fail).
        self.assertTrue(self.daemon.call('sessions.register', params)['ok'])
        self.assertEqual(len(self.daemon.call('sessions.list')['sessions']), 1)

    def test_wrong_token_answers_invalid_token_logs_and_closes(self):
        conn = self.connect_tcp(self.address)
        wrong = self.token[:-1] + ('A' if self.token[-1] != 'A' else 'B')  # one char off
        conn.send_json(request(1, 'auth', {'token': wrong}))
        self.assertError(conn.read_json(), 1, AUTH_ERROR, 'invalid_token')
        self.assertEqual(conn.read_to_end(), b'')
        lines = self.daemon.wait_for_log('ipc_auth_failed')
        self.assertEqual(lines[0].get('transport'), 'tcp', lines[0])
        self.assertEqual(lines[0].get('level'), 'warn', lines[0])
        self.assertNotIn(self.token, self.daemon.stdout() + self.daemon.stderr())

    def test_wrong_token_after_auth_also_closes(self):
        """A wrong `auth` on an authenticated TCP connection answered but left it open
        (spec/daemon.md §8.2: invalid_token, TCP: connection closed)."""
        conn = self.connect_tcp(self.address)
        answer = self.call_on(conn, 1, 'auth', {'token': self.token})
        self.assertEqual(self.assertResult(answer, 1), {'ok': True})
        self.assertError(self.call_on(conn, 2, 'auth', {'token': 'wrong'}), 2,
                         AUTH_ERROR, 'invalid_token')
        conn.sock.settimeout(5.0)  # an answered close is immediate; don't wait the default
        self.assertEqual(conn.read_to_end(), b'')

    def test_http_request_closes_without_answer(self):
        conn = self.connect_tcp(self.address)
        conn.send(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertEqual(conn.read_to_end(), b'')

    def test_correct_token_authenticates_the_connection(self):
        conn = self.connect_tcp(self.address)
        answer = self.call_on(conn, 1, 'auth', {'token': self.token})
        self.assertEqual(self.assertResult(answer, 1), {'ok': True})
        health = self.assertResult(self.call_on(conn, 2, 'daemon.health'), 2)
        self.assertTrue(health['ok'])
        self.assertEqual(health['tcp'], self.address)
        # After auth, bad JSON is a parse error like on the Unix socket, not a close.
        conn.send(b'nonsense\n')
        self.assertError(conn.read_json(), None, PARSE_ERROR, 'parse_error')
        self.assertResult(self.call_on(conn, 3, 'daemon.version'), 3)

    def test_cli_call_over_tcp(self):
        done = self.run_cli('call', '--tcp', '--tcp-port', str(self.port), 'daemon.health')
        self.assertEqual(done.returncode, 0, done.stderr)
        health = json.loads(done.stdout)
        self.assertTrue(health['ok'])
        self.assertEqual(health['tcp'], self.address)


class PublicHealthTest(RpcTestCase):

    def test_public_health_answers_health_before_auth_and_nothing_else(self):
        daemon = self.start_daemon(args=['--tcp', '--tcp-port', '0', '--public-health'])
        address = daemon.call('daemon.health')['tcp']
        conn = self.connect_tcp(address)
        conn.send_json(request(1, 'daemon.health'))
        self.assertTrue(self.assertResult(conn.read_json(), 1)['ok'])
        conn.send_json(request(2, 'daemon.health'))  # still open, still unauthenticated
        self.assertResult(conn.read_json(), 2)
        conn.send_json(request(3, 'sessions.list'))
        self.assertError(conn.read_json(), 3, AUTH_ERROR, 'auth_required')
        self.assertEqual(conn.read_to_end(), b'')


class PeerUidTest(RpcTestCase):

    def test_unix_peer_of_another_uid_is_refused(self):
        nobody = pwd.getpwnam('nobody')
        self.assertNotEqual(os.getuid(), nobody.pw_uid)
        os.chmod(self.home, 0o755)  # let nobody traverse to its home
        home = os.path.join(self.home, 'h')
        os.mkdir(home, 0o700)
        os.chown(home, nobody.pw_uid, nobody.pw_gid)

        def as_nobody():
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.umask(0o077)

        daemon = self.start_daemon(home=home, wait=False, preexec_fn=as_nobody)

        def started():
            if daemon.proc.poll() is not None:
                raise AssertionError('daemon exited with %s: %s' % (daemon.proc.returncode,
                                                                    daemon.stderr()))
            return [entry for entry in daemon.log_lines() if entry.get('msg') == 'daemon_started']
        wait_for(started, what='daemon_started')
        self.assertEqual(os.stat(daemon.socket).st_uid, nobody.pw_uid)

        # Control: a client of the daemon's own uid is answered.
        mine = subprocess.run(['socat', '-', 'UNIX-CONNECT:' + daemon.socket],
                              input=line(request(1, 'daemon.version')), capture_output=True,
                              timeout=DEADLINE, preexec_fn=as_nobody)
        self.assertResult(json.loads(mine.stdout.split(b'\n', 1)[0] or b'null'), 1)

        conn = self.connect(daemon)
        try:
            conn.send_json(request(2, 'daemon.version'))
        except (BrokenPipeError, ConnectionResetError):
            pass  # already closed by the daemon: fine
        self.assertEqual(conn.read_to_end(reset_ok=True), b'')
        lines = daemon.wait_for_log('ipc_peer_uid_rejected')
        self.assertEqual(lines[0].get('uid'), 0, lines[0])
        self.assertEqual(lines[0].get('level'), 'warn', lines[0])


class InProcessServerTest(RpcTestCase):
    """The RPC server and the API table in this process, to look at the bus behind them."""

    def setUp(self):
        super().setUp()
        self.store = Store(models_database).open_sqlite(os.path.join(self.home, 'meshd.db'))
        self.addCleanup(self.store.close)
        migrate.migrate(self.store, MIGRATIONS)
        self.bus = EventBus(self.store, 'epoch-x')
        methods = MethodTable()
        # The method groups get what they use, so the test builds them from real parts.
        api.register(methods, [
            EventMethods(self.bus, 0.1, lambda slug: None),
            DaemonMethods(lambda: ('epoch-x', migrate.schema_version(self.store)),
                          lambda: {'ok': True}, lambda: {'ok': True}, None)])
        self.socket_path = os.path.join(self.home, 'rpc.sock')
        self.server = RpcServer(methods, self.socket_path)
        self.server.start()
        self.addCleanup(self.server.stop, 1.0)

    def subscribers_drop_to_zero(self):
        wait_for(lambda: self.bus.subscriber_count == 0, timeout=5.0,
                 what='the event bus to have no subscriber')

    def test_closed_subscription_leaves_no_subscriber(self):
        conn = Raw.unix(self.socket_path)
        self.assertResult(self.call_on(conn, 1, 'events.subscribe'), 1)
        self.assertEqual(self.bus.subscriber_count, 1)
        conn.close()
        self.subscribers_drop_to_zero()

    def test_subscribe_sent_as_notification_leaves_no_subscriber(self):
        """events.subscribe sent as a notification left a bus subscriber behind for the life
        of the daemon, its queue collecting every later event (the stream never started)."""
        conn = Raw.unix(self.socket_path)
        conn.send_json(notification('events.subscribe'))
        self.assertResult(self.call_on(conn, 1, 'daemon.version'), 1)
        conn.close()
        self.bus.publish('system', {'event': 'probe'})
        self.subscribers_drop_to_zero()
