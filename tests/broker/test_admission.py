"""Nobody locks members out of the broker without credentials (DESIGN.md 27; finding 3).

Sockets that never say hello, raw connections that never send a request, and a full
WebSocket pool, against an in-process broker; other source addresses are 127.0.0.2 and up
(the loopback /8), so "another client" is a real other address.
"""
import logging
import socket
import unittest

import websocket

from meshd.broker import admission
from tests.base import DEADLINE, wait_for
from tests.broker.base import BrokerTestMixin, Peer, hello_frame


def connect_from(source, port, headers=None):
    """A WebSocket to the broker whose TCP connection comes from `source`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE)
    sock.bind((source, 0))
    sock.connect(('127.0.0.1', port))
    ws = websocket.create_connection('ws://127.0.0.1:%d/ws' % port, socket=sock,
                                     timeout=DEADLINE, header=headers or [])
    peer = Peer.__new__(Peer)
    peer.ws, peer.closed = ws, None
    return peer


def upgrade_status(source, port, headers=None):
    """101 when the upgrade is accepted, else the HTTP status of the refusal."""
    try:
        connect_from(source, port, headers).close()
        return 101
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class AdmissionTest(BrokerTestMixin, unittest.TestCase):

    timings = {'broker_hello_timeout': 2.0, 'broker_request_timeout': 2.0}

    def setUp(self):
        super().setUp()
        self.records = _Records()
        logging.getLogger('meshd.broker.admission').addHandler(self.records)
        self.addCleanup(logging.getLogger('meshd.broker.admission').removeHandler, self.records)
        self.alice = self.member('alice')

    def silent(self, source, count):
        peers = []
        for _ in range(count):
            try:
                peer = connect_from(source, self.broker.port)
            except websocket.WebSocketBadStatusException:
                continue
            self.addCleanup(peer.close)
            peers.append(peer)
        return peers

    def health_from(self, source):
        sock = socket.create_connection(('127.0.0.1', self.broker.port), timeout=DEADLINE,
                                        source_address=(source, 0))
        try:
            sock.sendall(b'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
            data = b''
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return data.split(b'\r\n', 1)[0]
                data += chunk
        finally:
            sock.close()

    def test_sockets_that_never_say_hello_cannot_lock_members_out(self):
        """1,153 upgrades that never sent hello filled the broker's 1,024 places; /health
        and members' hellos timed out, and hello-less sockets lived for 75 s."""
        silent = self.silent('127.0.0.1', 200)
        self.assertEqual(len(silent), admission.DEFAULT_PER_ADDRESS)
        self.assertIn(b'200', self.health_from('127.0.0.1'))
        member = connect_from('127.0.0.2', self.broker.port)
        self.addCleanup(member.close)
        member.send(hello_frame(self.alice))
        self.assertEqual(member.expect('hello_ack')['type'], 'hello_ack')
        closes = [peer.expect_close() for peer in silent]
        self.assertEqual({(c.code, c.reason) for c in closes}, {(1008, 'hello timeout')})
        again = connect_from('127.0.0.1', self.broker.port)
        self.addCleanup(again.close)
        again.send(hello_frame(self.alice, sessionId='second-daemon'))
        self.assertEqual(again.expect('hello_ack', skip=('peer_joined',))['type'], 'hello_ack')
        self.assertTrue(any('broker_admission_refused' in m for m in self.records.messages))
        self.assertTrue(any('broker_hello_timeout' in m for m in self.records.messages))

    def test_raw_connections_without_a_request_are_capped_per_address_and_time_out(self):
        raw = []
        for _ in range(40):
            sock = socket.create_connection(('127.0.0.1', self.broker.port), timeout=DEADLINE,
                                            source_address=('127.0.0.3', 0))
            self.addCleanup(sock.close)
            raw.append(sock)
        self.assertIn(b'200', self.health_from('127.0.0.2'))

        def closed(sock):
            try:
                sock.settimeout(0.01)
                return sock.recv(1) == b''
            except socket.timeout:
                return False
            except OSError:
                return True
        wait_for(lambda: all(closed(sock) for sock in raw), what='raw sockets closed')
        self.assertIn(b'200', self.health_from('127.0.0.3'))


class FullBrokerTest(BrokerTestMixin, unittest.TestCase):

    broker_kwargs = {'max_connections': 20}

    def test_health_is_answered_when_every_websocket_place_is_taken(self):
        peers = []
        for index in range(20):
            peer = connect_from('127.0.0.%d' % (10 + index % 2), self.broker.port)
            self.addCleanup(peer.close)
            peers.append(peer)
        self.assertEqual(upgrade_status('127.0.0.12', self.broker.port), 503)
        status, body, _headers = self.http_get('/health')
        self.assertEqual(status, 200)
        peers.pop().close()
        wait_for(lambda: upgrade_status('127.0.0.12', self.broker.port) == 101,
                 what='a place freed')


class TrustedProxyTest(BrokerTestMixin, unittest.TestCase):

    broker_kwargs = {'per_address_limit': 3, 'trusted_proxies': '127.0.0.1'}

    def test_forwarded_for_counts_only_behind_a_trusted_proxy(self):
        port = self.broker.port
        first = [connect_from('127.0.0.1', port, ['X-Forwarded-For: 10.0.0.1'])
                 for _ in range(3)]
        for peer in first:
            self.addCleanup(peer.close)
        self.assertEqual(upgrade_status('127.0.0.1', port, ['X-Forwarded-For: 10.0.0.1']), 429)
        self.assertEqual(upgrade_status('127.0.0.1', port, ['X-Forwarded-For: 10.0.0.2']), 101)
        # From a peer that is not a trusted proxy the header is ignored: its own address counts.
        spoofed = [connect_from('127.0.0.5', port, ['X-Forwarded-For: 10.0.0.%d' % i])
                   for i in range(3)]
        for peer in spoofed:
            self.addCleanup(peer.close)
        self.assertEqual(upgrade_status('127.0.0.5', port, ['X-Forwarded-For: 10.9.9.9']), 429)
