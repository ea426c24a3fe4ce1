"""The broker's use of gevent-websocket 0.10.1: frame limits, close frames, pongs (spec/wire.md §1).

gevent-websocket reads any frame length it is told and ignores the code passed to close()
(DESIGN.md 22), so this module reads frames itself on top of the library's Header decoder:
a frame whose header announces more than the hard limit (alone or as the running total of a
fragmented message) is refused with 1009 before its payload is read, and every close frame is
written here as `struct.pack('!H', code) + reason`. Every write to one socket goes through the
socket's own lock with a timeout, because fan-out from other greenlets writes to it too.
"""
import logging
import socket
import struct
import time

import gevent
import gevent.lock
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import Header, Stream, WebSocket

from meshd.broker import protocol

log = logging.getLogger(__name__)

WRITE_TIMEOUT = 10.0
CONTROL_OPCODES = (WebSocket.OPCODE_CLOSE, WebSocket.OPCODE_PING, WebSocket.OPCODE_PONG)


class FrameTooLarge(Exception):
    """An inbound frame (or fragmented message) announced more than the hard limit."""


class StreamEnded(Exception):
    """The peer closed the connection, sent a close frame, or broke the framing."""


class BrokerWebSocket(WebSocket):
    """A gevent-websocket WebSocket with bounded reads, locked writes and real close codes."""

    def __init__(self, environ, stream, handler):
        super(BrokerWebSocket, self).__init__(environ, stream, handler)
        self.lock = gevent.lock.Semaphore()
        self.max_frame_bytes = 1048576
        self.write_timeout = WRITE_TIMEOUT
        self.last_pong_at = time.monotonic()
        self.on_pong = None
        self.terminated = False
        self.address = None     # the client's address, as admission counts it

    @property
    def is_open(self):
        """True until a close frame was written, the peer went away or the socket was terminated."""
        return not self.closed and not self.terminated

    # ------------------------------------------------------------------ reading

    def next_message(self):
        """Read the next text or binary message and return its bytes.

        Answers pings, records pongs and replies to a close frame on the way. Raises
        FrameTooLarge before reading an oversize payload, StreamEnded at the end of the stream.
        """
        opcode = None
        message = bytearray()
        while True:
            try:
                header = Header.decode_header(self.stream)
            except (WebSocketError, ProtocolError, socket.error, AttributeError, TypeError):
                raise StreamEnded()
            if header.flags:
                self._close_quietly(1002, 'protocol error')
                raise StreamEnded()
            if header.opcode not in CONTROL_OPCODES and len(message) + header.length > self.max_frame_bytes:
                raise FrameTooLarge(len(message) + header.length)
            payload = self._read_exactly(header.length)
            if header.mask:
                payload = bytes(header.unmask_payload(payload))
            if header.opcode == self.OPCODE_PING:
                self.send_raw(payload, self.OPCODE_PONG)
                continue
            if header.opcode == self.OPCODE_PONG:
                self.last_pong_at = time.monotonic()
                if self.on_pong is not None:
                    self.on_pong()
                continue
            if header.opcode == self.OPCODE_CLOSE:
                code = struct.unpack('!H', payload[:2])[0] if len(payload) >= 2 else 1000
                # Echo the peer's code, as RFC 6455 asks; 1005/1006 may not appear on the wire.
                self._close_quietly(1000 if code in (1005, 1006) or code < 1000 else code, '')
                raise StreamEnded()
            if header.opcode in (self.OPCODE_TEXT, self.OPCODE_BINARY):
                if opcode is not None:
                    self._close_quietly(1002, 'protocol error')
                    raise StreamEnded()
                opcode = header.opcode
            elif header.opcode == self.OPCODE_CONTINUATION:
                if opcode is None:
                    self._close_quietly(1002, 'protocol error')
                    raise StreamEnded()
            else:
                self._close_quietly(1002, 'protocol error')
                raise StreamEnded()
            message += payload
            if header.fin:
                return bytes(message)

    def _read_exactly(self, length):
        if not length:
            return b''
        try:
            payload = self.raw_read(length)
        except (socket.error, AttributeError, TypeError):
            raise StreamEnded()
        if payload is None or len(payload) != length:
            raise StreamEnded()
        return payload

    # ------------------------------------------------------------------ writing

    def send_raw(self, payload, opcode):
        """Write one frame under the socket's lock; return False (and terminate) when it fails."""
        if not self.is_open:
            return False
        try:
            with self.lock:
                with gevent.Timeout(self.write_timeout):
                    if not self.is_open:
                        return False
                    header = Header.encode_header(True, opcode, b'', len(payload), 0)
                    self.raw_write(header + payload)
            return True
        except (gevent.Timeout, socket.error, WebSocketError, AttributeError, TypeError):
            log.info('write failed; terminating connection')
            self.terminate()
            return False

    def send_json(self, frame):
        """Write one compact JSON text frame."""
        return self.send_raw(protocol.encode(frame).encode('utf-8'), self.OPCODE_TEXT)

    def ping(self):
        """Send a WebSocket ping (the keepalive's probe)."""
        return self.send_raw(b'', self.OPCODE_PING)

    def close_with(self, code, reason=''):
        """Write a close frame with `code` and `reason`, then shut the socket down.

        Safe to call from any greenlet: the connection's own reader wakes up with end of stream.
        """
        self._close_quietly(code, reason)
        self._shutdown()

    def _close_quietly(self, code, reason):
        if not self.is_open:
            return
        payload = struct.pack('!H', code) + reason.encode('utf-8')
        self.send_raw(payload, self.OPCODE_CLOSE)
        self.closed = True

    def terminate(self):
        """Drop the TCP connection with no close frame (the stale-pong watchdog's "terminate")."""
        self.terminated = True
        self._shutdown()

    def _shutdown(self):
        sock = getattr(self.handler, 'socket', None)
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except (socket.error, OSError):
            pass

    def close(self, code=1000, message=b''):
        """gevent-websocket's close(), made to write a real close frame (DESIGN.md 22)."""
        if isinstance(message, bytes):
            message = message.decode('utf-8', 'replace')
        self._close_quietly(code, message or '')
        self.closed = True


class BrokerHandler(WebSocketHandler):
    """WebSocketHandler that upgrades to BrokerWebSocket instead of the library's class,
    under the broker's admission rules (`server.admission`, meshd/broker/admission.py)."""

    def handle(self):
        admission = self.server.admission
        self._peer = self.client_address[0] if isinstance(self.client_address, tuple) else ''
        if not admission.enter(self._peer):
            self._drop_socket()
            return
        self._in_http = True
        # pywsgi waits for a request line for ever: a deadline frees the place.
        self.socket.settimeout(admission.request_timeout)
        try:
            super(BrokerHandler, self).handle()
        except socket.timeout:
            pass
        finally:
            self._leave_http()

    def _leave_http(self):
        if getattr(self, '_in_http', False):
            self._in_http = False
            self.server.admission.leave(self._peer)

    def _drop_socket(self):
        try:
            self.socket.close()
        except (OSError, AttributeError):
            pass

    def upgrade_connection(self):
        admission = self.server.admission
        address = admission.address(self.environ)
        refusal = admission.refuse_upgrade(address, len(self.server.broker_sockets))
        if refusal is not None:
            status, text = refusal
            self.start_response(status, [('Content-Type', 'text/plain; charset=utf-8'),
                                         ('Content-Length', str(len(text))),
                                         ('Connection', 'close')])
            return [text.encode('utf-8')]
        # Frames are small and written back to back (an ack, then a push or a reply): without
        # TCP_NODELAY, Nagle holds the second until the peer's delayed ACK, 40 ms later.
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        result = super(BrokerHandler, self).upgrade_connection()
        original = getattr(self, 'websocket', None)
        if original is not None and not isinstance(original, BrokerWebSocket):
            # The library's object must never write anything (its __del__ would send a bare close).
            original.closed = True
            self.websocket = BrokerWebSocket(self.environ, Stream(self), self)
            self.environ['wsgi.websocket'] = self.websocket
        if original is not None:
            # From here the socket counts as a WebSocket that has not said hello yet: the
            # hello deadline replaces the request deadline.
            self._leave_http()
            self.socket.settimeout(None)
            self.websocket.address = address
            admission.upgraded(address)
        return result

    def log_request(self):
        # pywsgi logs every request to stderr; the broker logs its own events instead.
        pass
