"""A blocking JSON-RPC client for the daemon's Unix socket or TCP port (the CLI's and tests')."""
import itertools
import json
import socket

from rpc.protocol import MAX_LINE, encode, request


class RpcCallError(Exception):
    """The daemon answered with an error object."""

    def __init__(self, error):
        self.error = error if isinstance(error, dict) else {'message': str(error)}
        data = self.error.get('data') or {}
        self.code = self.error.get('code')
        self.slug = data.get('code') if isinstance(data, dict) else None
        self.data = data if isinstance(data, dict) else {}
        super().__init__('%s (%s)' % (self.error.get('message'), self.slug))


class RpcConnectionError(Exception):
    """The daemon could not be reached, or closed the connection; `errno` when an OS error
    said why (EAGAIN: the listen queue of a Unix socket is full)."""

    def __init__(self, message, errno=None):
        super().__init__(message)
        self.errno = errno


class RpcClient:
    """One connection. `call()` returns a result or raises RpcCallError."""

    def __init__(self, socket_path=None, tcp_address=None, timeout=5.0):
        if (socket_path is None) == (tcp_address is None):
            raise ValueError('give exactly one of socket_path and tcp_address')
        self.socket_path = socket_path
        self.tcp_address = tcp_address
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock = None
        self._rfile = None
        self._pending = []  # notifications read while waiting for an answer

    def connect(self):
        try:
            if self.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
            else:
                host, _, port = self.tcp_address.rpartition(':')
                sock = socket.create_connection((host, int(port)), timeout=self.timeout)
        except (OSError, ValueError) as exc:
            raise RpcConnectionError('cannot connect to %s: %s' % (self.where, exc),
                                     getattr(exc, 'errno', None))
        self._sock = sock
        self._rfile = sock.makefile('rb')
        return self

    @property
    def where(self):
        return self.socket_path or self.tcp_address

    def __enter__(self):
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        for closable in (self._rfile, self._sock):
            if closable is not None:
                try:
                    closable.close()
                except OSError:
                    pass
        self._sock = self._rfile = None

    def send_raw(self, data):
        """Write raw bytes (tests use it for framing edge cases)."""
        if self._sock is None:
            self.connect()
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise RpcConnectionError('write to %s failed: %s' % (self.where, exc))

    def read_message(self, timeout=None):
        """The next line from the daemon as JSON; RpcConnectionError at end of stream."""
        if self._sock is None:
            raise RpcConnectionError('not connected')
        self._sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            line = self._rfile.readline(MAX_LINE + 1)
        except socket.timeout:
            raise RpcConnectionError('ipc_timeout: no answer from %s' % self.where)
        except OSError as exc:
            raise RpcConnectionError('read from %s failed: %s' % (self.where, exc))
        if not line:
            raise RpcConnectionError('connection closed by %s' % self.where)
        return json.loads(line)

    def request(self, method, params=None, timeout=None):
        """Send one request and return the whole response object."""
        request_id = next(self._ids)
        self.send_raw(encode(request(request_id, method, params)))
        while True:
            message = self.read_message(timeout)
            if isinstance(message, dict) and 'id' not in message:
                self._pending.append(message)
                continue
            return message

    def call(self, method, params=None, timeout=None):
        """The result of `method`, or RpcCallError with the error object."""
        message = self.request(method, params, timeout)
        if 'error' in message:
            raise RpcCallError(message['error'])
        return message.get('result')

    def notifications(self, timeout=None):
        """Yield notifications (events, keepalives) as they arrive, until the stream ends."""
        while True:
            if self._pending:
                yield self._pending.pop(0)
                continue
            try:
                yield self.read_message(timeout)
            except RpcConnectionError:
                return

    def next_notification(self, timeout=None):
        """The next notification; RpcConnectionError on timeout or end of stream."""
        if self._pending:
            return self._pending.pop(0)
        return self.read_message(timeout)
