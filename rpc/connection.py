"""One client connection of the RPC server, and the answers a handler can give.

`Connection` owns a socket's writes (one lock for responses and notifications) and the
order of its answers: a pipelined method's Pending is answered in request order by the
connection's answering greenlet. `Stream` and `Pending` are what a handler returns instead
of a plain result; `CallContext` is what a handler sees.
"""
import collections
import socket
import time

import gevent
import gevent.event
import gevent.lock

from rpc.protocol import encode


class LineWriter:
    """Writes whole JSON-RPC lines with `write(data)`, one writer at a time (responses and
    notifications share a peer); after a failed write, `closed` is set and writes stop."""

    def __init__(self, write, closed):
        self._write = write
        self.closed = closed
        self._lock = gevent.lock.Semaphore()

    def send(self, message):
        """Write one message as a line; False when the peer is gone."""
        if self.closed.is_set():
            return False
        data = encode(message)
        with self._lock:
            try:
                self._write(data)
                return True
            except (OSError, ValueError):
                self.closed.set()
                return False


class Stream:
    """A handler's answer that keeps streaming: `result` goes out first, then `run(conn)`.

    `run` is called in its own greenlet after the response line is written. It returns when
    the connection closes, a write fails or the server stops (`conn.stopping` is set).
    """

    def __init__(self, result, run, cancel=None):
        self.result = result
        self.run = run
        self.cancel = cancel  # undoes what the handler set up when the stream never starts


class Pending:
    """A handler's answer that is not ready yet: `finish(waitable.get())` is the result.

    `finish` runs in the connection's answering greenlet and may raise RpcError like a
    handler. Only methods registered `pipelined` may return one.
    """

    def __init__(self, waitable, finish):
        self.waitable = waitable
        self.finish = finish


class Connection:
    """One client connection: its transport, auth state, attached session and writer."""

    def __init__(self, sock, transport, server, peer_uid=None, peer_pid=None):
        self.sock = sock
        self.transport = transport
        self.peer_uid = peer_uid
        self.peer_pid = peer_pid    # Unix socket only: the process that connected
        self.authenticated = transport == 'uds'
        self.session_token = None
        self.stream = None
        self.stopping = server.stopping
        self.closed = gevent.event.Event()
        self.opened_at = self.last_activity = time.monotonic()
        self.in_call = False
        self._writer = LineWriter(sock.sendall, self.closed)
        self._answers = collections.deque()     # (request id, Pending or ready answer)
        self._answerer = None
        self._server = server

    @property
    def answers_pending(self):
        return bool(self._answers) or (self._answerer is not None and not self._answerer.dead)

    @property
    def answers_owed(self):
        return len(self._answers)

    @property
    def is_idle(self):
        """Neither running a call, nor streaming events, nor owed answers: it may be closed."""
        return not (self.in_call or self.stream is not None or self.answers_pending
                    or self.closed.is_set())

    def answer_in_order(self, request_id, answer):
        """Queue an answer (a ready message, or a Pending for `request_id`) behind the others."""
        self._answers.append((request_id, answer))
        if self._answerer is None or self._answerer.dead:
            self._answerer = gevent.spawn(self._answer_queued)

    def wait_answers(self):
        """Return once every queued answer was written (or the connection is gone)."""
        while self.answers_pending:
            self._answerer.join()

    def _answer_queued(self):
        while self._answers:
            request_id, answer = self._answers.popleft()
            if isinstance(answer, Pending):
                answer = self._server.finish_pending(request_id, answer)
            if answer is not None:
                self.send(answer)

    def send(self, message):
        """Write one message as a line; False when the peer is gone."""
        return self._writer.send(message)

    def close(self):
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class CallContext:
    """What a handler sees: the connection and its session (resolved per call)."""

    def __init__(self, server, conn):
        self.server = server
        self.conn = conn
        self._session = None
        self._resolved = False

    @property
    def session(self):
        if not self._resolved:
            self._resolved = True
            token = self.conn.session_token
            if token is not None and self.server.session_resolver is not None:
                self._session = self.server.session_resolver(token)
        return self._session
