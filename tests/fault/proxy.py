"""A TCP proxy for fault-injection tests, running in the (gevent-patched) test process.

`TcpProxy(host, port).start()` listens on 127.0.0.1:0 and forwards every connection to
host:port, one greenlet per direction. `cut()` is a network cut: every connection it carries
is reset at once on both sides (SO_LINGER 0, so the peers read ECONNRESET rather than a clean
end of stream), and until `restore()` new connections are refused (accepted, then reset) or,
with `cut(new='hold')`, held unanswered: their bytes wait in the kernel and they are bridged to
the target when the cut ends, as a TCP handshake retried across a short outage would be.
`counts` records what happened. Nothing here sleeps; `close()` ends every greenlet and socket.
"""
import socket
import struct

import gevent
import gevent.event
import gevent.pool

BUFFER = 65536
CONNECT_TIMEOUT = 5.0
NEW_MODES = ('refuse', 'hold')


def _reset(sock):
    """Close `sock` abruptly: with SO_LINGER 0 the kernel sends RST, not FIN."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _nodelay(sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class _Connection:
    """One proxied connection: the client's socket, the target's, the two pumps."""

    def __init__(self, client):
        self.client = client
        self.upstream = None
        self.pumps = []

    def abort(self):
        """Reset both sockets at once, then end the pumps (a pump may call it too).

        The sockets go first and without yielding: a pump ending first would let its
        connection close them gracefully (FIN), which is not what a cut looks like.
        """
        client, upstream = self.client, self.upstream
        self.client = self.upstream = None
        _reset(client)
        _reset(upstream)
        current = gevent.getcurrent()
        gevent.killall([pump for pump in self.pumps if pump is not current], block=False)

    def close(self):
        for sock in (self.client, self.upstream):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self.client = self.upstream = None


class TcpProxy:
    """Forward 127.0.0.1:<port> to (host, port); `cut()` and `restore()` the path."""

    def __init__(self, target_host, target_port, listen_host='127.0.0.1'):
        self.target = (target_host, int(target_port))
        self.listen_host = listen_host
        self.counts = {'accepted': 0, 'forwarded': 0, 'refused': 0, 'held': 0,
                       'upstream_failed': 0, 'reset_by_cut': 0, 'cuts': 0, 'restores': 0,
                       'bytes_up': 0, 'bytes_down': 0}
        self._listener = None
        self._acceptor = None
        self._group = gevent.pool.Group()
        self._live = set()
        self._held = set()
        self._cut = False
        self._new = 'refuse'
        self._generation = 0             # bumped by every cut: a connect racing it is reset
        self._restored = gevent.event.Event()
        self._restored.set()
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    def start(self):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, 0))
        listener.listen(64)
        self._listener = listener
        self._acceptor = gevent.spawn(self._accept_loop)
        return self

    @property
    def port(self):
        return self._listener.getsockname()[1]

    @property
    def url(self):
        """The broker URL a daemon uses to reach the target through this proxy."""
        return 'ws://%s:%d/ws' % (self.listen_host, self.port)

    @property
    def is_cut(self):
        return self._cut

    @property
    def live(self):
        """How many connections are being forwarded now."""
        return len(self._live)

    @property
    def held(self):
        """How many connections wait for `restore()` now."""
        return len(self._held)

    def close(self):
        """Stop listening and end every connection and greenlet; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._acceptor is not None:
            self._acceptor.kill(block=True)
        if self._listener is not None:
            self._listener.close()
        for connection in list(self._live):
            connection.abort()
        self._restored.set()              # held connections see _closed and reset
        self._group.kill(block=True, timeout=5)
        for connection in list(self._held) + list(self._live):
            connection.close()
        self._held.clear()
        self._live.clear()

    # -- faults --------------------------------------------------------------------------

    def cut(self, new='refuse'):
        """Reset every connection now; refuse (or hold) new ones until `restore()`.

        Returns how many connections were reset.
        """
        if new not in NEW_MODES:
            raise ValueError('new must be one of %s' % (NEW_MODES,))
        self._cut, self._new = True, new
        self._generation += 1
        self._restored.clear()
        self.counts['cuts'] += 1
        connections = list(self._live)
        self._live.clear()
        for connection in connections:
            connection.abort()
        self.counts['reset_by_cut'] += len(connections)
        return len(connections)

    def restore(self):
        """End the cut: new connections are forwarded, held ones are bridged now."""
        self._cut = False
        self.counts['restores'] += 1
        self._restored.set()

    # -- forwarding ----------------------------------------------------------------------

    def _accept_loop(self):
        while True:
            try:
                client, _address = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                raise
            self.counts['accepted'] += 1
            self._group.spawn(self._serve, client)

    def _serve(self, client):
        connection = _Connection(client)
        try:
            if self._cut and self._new == 'refuse':
                self.counts['refused'] += 1
                _reset(client)
                connection.client = None
                return
            if self._cut:
                self.counts['held'] += 1
                self._held.add(connection)
                try:
                    self._restored.wait()
                finally:
                    self._held.discard(connection)
                if self._closed:
                    connection.abort()
                    return
            generation = self._generation
            try:
                upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT)
            except OSError:
                self.counts['upstream_failed'] += 1
                connection.abort()
                return
            upstream.settimeout(None)
            connection.upstream = upstream
            if self._cut or self._generation != generation or self._closed:
                connection.abort()        # a cut came while the target was being reached
                return
            _nodelay(client)
            _nodelay(upstream)
            self.counts['forwarded'] += 1
            self._live.add(connection)
            connection.pumps = [
                self._group.spawn(self._pump, connection, client, upstream, 'bytes_up'),
                self._group.spawn(self._pump, connection, upstream, client, 'bytes_down')]
            gevent.joinall(connection.pumps)
        finally:
            self._live.discard(connection)
            connection.close()

    def _pump(self, connection, source, sink, counter):
        """Copy one direction; end of stream half-closes the other side, an error resets both."""
        try:
            while True:
                data = source.recv(BUFFER)
                if not data:
                    try:
                        sink.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                sink.sendall(data)
                self.counts[counter] += len(data)
        except OSError:
            # One side broke: the other must not stay half open. Reset both, as the
            # network would have; the other pump ends with an error of its own.
            self._live.discard(connection)
            connection.abort()
