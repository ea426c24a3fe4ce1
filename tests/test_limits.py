"""No local client can lock the owner out of the daemon (DESIGN.md 27; finding 2).

Against a real daemon process: TCP connections that never `auth`, and idle or busy Unix
socket connections, beyond each transport's capacity.
"""
import json
import os
import socket

from rpc.admission import TCP_CAPACITY, UDS_CAPACITY
from rpc.client import RpcClient
from tests.base import DEADLINE, MeshdTestCase, Raw, line, make_mesh, request, wait_for


class LocalLimitsTest(MeshdTestCase):

    def open_raw(self, opener, count):
        conns = []
        for _ in range(count):
            conn = opener()
            self.addCleanup(conn.close)
            conns.append(conn)
        return conns

    def closed_by_daemon(self, conn):
        try:
            conn.sock.settimeout(0.01)
            return conn.sock.recv(1) == b''
        except socket.timeout:
            return False
        except OSError:
            return True

    def test_tcp_connections_that_never_auth_cannot_lock_the_owner_out(self):
        """300 loopback TCP connections that never sent `auth` filled the pool the Unix
        socket shared with TCP; the owner's calls timed out."""
        daemon = self.start_daemon(args=['--tcp', '--tcp-port', '0'],
                                   timings={'ipc_auth_timeout': 2.0})
        address = daemon.call('daemon.health')['tcp']
        host, _, port = address.rpartition(':')
        silent = self.open_raw(lambda: Raw(socket.create_connection((host, int(port)))),
                               TCP_CAPACITY + 40)
        # The owner's socket has its own capacity: answered at once.
        with RpcClient(socket_path=daemon.socket, timeout=DEADLINE) as client:
            self.assertTrue(client.call('daemon.health')['ok'])
        # A TCP client with the token gets in too: a silent connection makes room.
        with open(os.path.join(self.home, 'daemon', 'local-token')) as handle:
            token = handle.read().strip()
        owner = Raw(socket.create_connection((host, int(port))))
        self.addCleanup(owner.close)
        owner.send(line(request(1, 'auth', {'token': token})))
        self.assertEqual(owner.read_json()['result'], {'ok': True})
        owner.send(line(request(2, 'daemon.version')))
        self.assertIn('result', owner.read_json())
        # Past the auth deadline every silent connection is closed; the owner's stays.
        wait_for(lambda: all(self.closed_by_daemon(conn) for conn in silent),
                 what='silent TCP connections closed after the auth deadline')
        owner.sock.settimeout(DEADLINE)
        owner.send(line(request(3, 'daemon.version')))
        self.assertIn('result', owner.read_json())

    def test_idle_unix_connections_never_keep_a_new_client_out(self):
        """About 380 idle Unix-socket connections made the next client get EAGAIN."""
        daemon = self.start_daemon(timings={'ipc_idle_timeout': 3.0})
        idle = self.open_raw(lambda: Raw.unix(daemon.socket), UDS_CAPACITY + 60)
        subscriber = RpcClient(socket_path=daemon.socket, timeout=DEADLINE).connect()
        self.addCleanup(subscriber.close)
        self.assertIn('epoch', subscriber.call('events.subscribe'))
        for attempt in range(5):
            with RpcClient(socket_path=daemon.socket, timeout=DEADLINE) as client:
                self.assertEqual(client.call('daemon.version')['ipc_api'], 'v1')
        # Idle connections past the idle deadline are closed; a subscribed one stays.
        wait_for(lambda: all(self.closed_by_daemon(conn) for conn in idle),
                 what='idle connections closed')
        keepalive = subscriber.next_notification(timeout=DEADLINE)
        self.assertEqual(keepalive['method'], 'keepalive')
        self.assertTrue(daemon.wait_for_log('ipc_idle_connection_evicted'))

    def test_when_every_connection_works_a_newcomer_is_told_busy_not_down(self):
        """`meshd call` reported "down: not running" for a daemon that was only full."""
        daemon = self.start_daemon()
        streams = []
        for _ in range(UDS_CAPACITY):
            client = RpcClient(socket_path=daemon.socket, timeout=DEADLINE).connect()
            self.addCleanup(client.close)
            client.call('events.subscribe')
            streams.append(client)
        with RpcClient(socket_path=daemon.socket, timeout=DEADLINE) as client:
            answer = client.request('daemon.version')
        self.assertEqual(answer['error']['data']['code'], 'busy', answer)
        shown = self.run_cli('call', 'daemon.version')
        self.assertEqual(shown.returncode, 1)
        self.assertIn('busy', shown.stderr)
        self.assertNotIn('not running', shown.stderr)
        streams.pop().close()
        done = wait_for(lambda: (lambda r: r if r.returncode == 0 else None)(
            self.run_cli('call', 'daemon.version')), what='a place freed')
        self.assertEqual(json.loads(done.stdout)['ipc_api'], 'v1')

    def test_a_connection_owing_many_answers_stops_reading_until_they_are_out(self):
        """A per-connection bound on queued work: 3,000 pipelined sends on one connection
        are all answered, in order, while the daemon never holds more than its bound."""
        self.write_config([make_mesh('alpha')])
        daemon = self.start_daemon()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(DEADLINE)
        sock.connect(daemon.socket)
        count = 3000
        payload = b''.join(line(request(i, 'send', {'to': '*', 'message': 'm%d' % i}))
                           for i in range(count))
        reader = sock.makefile('rb')
        import gevent
        writer = gevent.spawn(sock.sendall, payload)
        ids = [json.loads(reader.readline())['id'] for _ in range(count)]
        writer.get(timeout=DEADLINE)
        self.assertEqual(ids, list(range(count)))
