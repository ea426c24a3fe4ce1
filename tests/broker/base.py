"""Helpers for the broker tests: raw websocket-client peers and hello frames.

The broker runs in the test process, started by tests.base.start_broker() (SQLite in a
short temp dir, or the PostgreSQL database of MESHD_TEST_PG_URL, emptied first). `Peer` is
a raw protocol client on websocket-client's low-level `recv_frame()`, so that the tests read
the exact frames, close codes and reasons the broker writes (DESIGN.md 22).
"""
import json
import socket
import struct
import urllib.request
import uuid

import websocket

from meshd import clock, crypto
from meshd.broker.message_queue import MessageQueue
from tests.base import DEADLINE, create_mesh, enrol, pg_url, start_broker

QUIET = 0.4     # how long "nothing arrives" is watched; never a sleep >= 0.5 s

# Long by default so that idle test peers are never pinged away; tests that need a loop shorten it.
TEST_TIMINGS = {
    'broker_ping': 600.0, 'broker_pong_timeout': 600.0, 'broker_grace': 60.0,
    'broker_lease': 30.0, 'broker_sweep': 600.0, 'broker_ttl_sweep': 600.0,
}


class Closed(object):
    """A close frame as the client read it."""

    def __init__(self, code, reason):
        self.code = code
        self.reason = reason

    def __repr__(self):
        return 'Closed(%r, %r)' % (self.code, self.reason)


_last_ts = [0]


def fresh_ts():
    """Now in ms, never the same twice: the broker refuses a replayed hello signature, and
    two hellos of one key signed in the same millisecond would carry the same one."""
    _last_ts[0] = max(clock.now_ms(), _last_ts[0] + 1)
    return _last_ts[0]


def hello_frame(ident, session_id=None, ts=None, **extra):
    ts = fresh_ts() if ts is None else ts
    frame = {'type': 'hello', 'meshId': ident.mesh_id, 'memberId': ident.member_id,
             'pubkey': ident.pub, 'sessionId': session_id or 'daemon-%s' % ident.pub[:16],
             'pid': 4242, 'cwd': '/tmp', 'hostname': 'testhost', 'peerType': 'ai',
             'channel': 'claudemesh-daemon', 'timestamp': ts}
    frame['signature'] = crypto.sign_hex(
        ident.sec, crypto.member_hello_text(ident.mesh_id, ident.member_id, ident.pub, ts))
    frame.update(extra)
    return frame


def session_hello_frame(ident, session_pub, session_sec, session_id=None, ts=None,
                        expires_at=None, **extra):
    ts = fresh_ts() if ts is None else ts
    expires_at = ts + 12 * 3600 * 1000 if expires_at is None else expires_at
    frame = {'type': 'session_hello', 'meshId': ident.mesh_id, 'parentMemberId': ident.member_id,
             'parentMemberPubkey': ident.pub, 'sessionPubkey': session_pub,
             'parentAttestation': crypto.make_attestation(ident.pub, ident.sec, session_pub, expires_at),
             'displayName': extra.pop('displayName', 'session-%s' % session_pub[:6]),
             'sessionId': session_id or 'sess-%s' % session_pub[:12], 'pid': 777, 'cwd': '/work',
             'hostname': 'testhost', 'peerType': 'ai', 'channel': 'claudemesh-session',
             'timestamp': ts}
    frame['signature'] = crypto.sign_hex(
        session_sec, crypto.session_hello_text(ident.mesh_id, ident.pub, session_pub, ts))
    frame.update(extra)
    return frame


class Peer(object):
    """A raw WebSocket client of the broker."""

    def __init__(self, url):
        self.ws = websocket.create_connection(url, timeout=DEADLINE)
        self.closed = None

    def send(self, frame):
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def send_raw(self, data, opcode=websocket.ABNF.OPCODE_TEXT):
        self.ws.send(data, opcode)

    def recv(self, timeout=DEADLINE):
        """The next text frame as a dict, or a Closed; raises on timeout or a dropped socket."""
        self.ws.settimeout(timeout)
        while True:
            frame = self.ws.recv_frame()
            if frame.opcode == websocket.ABNF.OPCODE_TEXT:
                return json.loads(frame.data.decode('utf-8'))
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                data = frame.data or b''
                code = struct.unpack('!H', data[:2])[0] if len(data) >= 2 else None
                self.closed = Closed(code, data[2:].decode('utf-8'))
                return self.closed
            if frame.opcode == websocket.ABNF.OPCODE_PING:
                self.ws.pong(frame.data)

    def recv_raw_text(self, timeout=DEADLINE):
        """The next text frame exactly as written (to check compact encoding and key order)."""
        self.ws.settimeout(timeout)
        while True:
            frame = self.ws.recv_frame()
            if frame.opcode == websocket.ABNF.OPCODE_TEXT:
                return frame.data.decode('utf-8')
            if frame.opcode == websocket.ABNF.OPCODE_PING:
                self.ws.pong(frame.data)

    def expect(self, kind, timeout=DEADLINE, skip=()):
        """Read frames until one of `type` (or push event) `kind`; frames in `skip` are dropped."""
        while True:
            frame = self.recv(timeout)
            if isinstance(frame, Closed):
                raise AssertionError('closed %r while waiting for %s' % (frame, kind))
            if frame.get('type') == kind or frame.get('event') == kind:
                return frame
            if frame.get('type') in skip or frame.get('event') in skip:
                continue
            raise AssertionError('expected %s, got %r' % (kind, frame))

    def expect_nothing(self, within=QUIET):
        """Assert that no text frame arrives within `within` seconds."""
        try:
            frame = self.recv(within)
        except websocket.WebSocketTimeoutException:
            return
        raise AssertionError('unexpected frame %r' % (frame,))

    def expect_close(self, timeout=DEADLINE):
        """Read until the close frame; return it (other frames are collected in .before)."""
        self.before = []
        while True:
            frame = self.recv(timeout)
            if isinstance(frame, Closed):
                return frame
            self.before.append(frame)

    def expect_dropped(self, timeout=DEADLINE):
        """Assert the connection ends without a close frame (a terminate)."""
        self.ws.settimeout(timeout)
        try:
            while True:
                frame = self.ws.recv_frame()
                if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                    raise AssertionError('got a close frame, expected a drop')
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            return

    def reset(self):
        """Abort the TCP connection (RST, no close frame)."""
        sock = self.ws.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        sock.close()

    def close(self):
        try:
            self.ws.close(timeout=0.2)
        except Exception:
            pass
        try:
            self.ws.shutdown()
        except Exception:
            pass


def dm_frame(sender_sec, recipient_pub, body, cmid=None, priority='next', **extra):
    nonce, ciphertext = crypto.seal_dm(body.encode('utf-8'), recipient_pub, sender_sec)
    cmid = cmid or str(uuid.uuid4())
    frame = {'type': 'send', 'id': cmid, 'client_message_id': cmid,
             'request_fingerprint': crypto.request_fingerprint(recipient_pub, priority, body),
             'targetSpec': recipient_pub, 'priority': priority, 'nonce': nonce,
             'ciphertext': ciphertext}
    frame.update(extra)
    return frame


def multicast_frame(target, body, msg_id='m1', priority='next'):
    nonce, ciphertext = crypto.encode_plain(body.encode('utf-8'))
    return {'type': 'send', 'id': msg_id, 'targetSpec': target, 'priority': priority,
            'nonce': nonce, 'ciphertext': ciphertext}


class BrokerTestMixin(object):
    """Shared set-up: a broker, one mesh, identities and peers, all cleaned up after each test.

    Subclasses set `backend` to 'sqlite' or 'postgresql'; `broker_kwargs` and `timings` tune the
    broker for one class.
    """

    backend = 'sqlite'
    timings = None
    broker_kwargs = {}

    def setUp(self):
        db_url = pg_url() if self.backend == 'postgresql' else None
        self.broker = start_broker(self, db_url, timings=dict(TEST_TIMINGS, **(self.timings or {})),
                                   **self.broker_kwargs)
        self.url = self.broker.url
        self.mesh = create_mesh(self.broker.store, 'Test Mesh')
        self.mesh_id = self.mesh['id']
        self.mesh_slug = self.mesh['slug']
        self.peers = []

    def member(self, name, role='member'):
        """Enroll a new member key; return its tests.base.Member."""
        return enrol(self.broker.store, self.mesh, name, role=role)

    def connect(self):
        peer = Peer(self.url)
        self.peers.append(peer)
        self.addCleanup(peer.close)
        return peer

    def hello(self, ident, **extra):
        """Connect and complete a member hello; return (peer, hello_ack)."""
        peer = self.connect()
        peer.send(hello_frame(ident, **extra))
        ack = peer.expect('hello_ack')
        return peer, ack

    def session(self, ident, session_keys=None, **extra):
        """Connect and complete a session_hello; return (peer, hello_ack, (pub, sec))."""
        pub, sec = session_keys or crypto.generate_keypair()
        peer = self.connect()
        peer.send(session_hello_frame(ident, pub, sec, **extra))
        ack = peer.expect('hello_ack')
        return peer, ack, (pub, sec)

    def http_get(self, path):
        with urllib.request.urlopen('http://127.0.0.1:%d%s' % (self.broker.port, path),
                                    timeout=DEADLINE) as resp:
            return resp.status, resp.read().decode('utf-8'), dict(resp.headers)

    def http_post(self, path, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode('utf-8')
        req = urllib.request.Request('http://127.0.0.1:%d%s' % (self.broker.port, path), data=data,
                                     headers={'Content-Type': 'application/json'}, method='POST')
        try:
            with urllib.request.urlopen(req, timeout=DEADLINE) as resp:
                return resp.status, json.loads(resp.read().decode('utf-8'))
        except urllib.error.HTTPError as exc:
            text = exc.read().decode('utf-8')
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, text

    def queue_rows(self, **where):
        with self.broker.store.connection():
            q = MessageQueue.select()
            for key, value in where.items():
                q = q.where(getattr(MessageQueue, key) == value)
            return list(q)
