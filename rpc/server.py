"""The JSON-RPC server: a Unix socket and an optional loopback TCP listener (spec/daemon.md §8.1).

One greenlet per connection reads lines until b'' (gevent's echoserver); rpc/admission.py
decides which connections are served and for how long.
Requests on one connection run in order and are answered in order. A method registered
`pipelined` (send) may return a Pending, an answer that is not ready yet (a row waiting for
its group commit): the connection then reads on, so a client that pipelines sends shares
commits, and any other request waits until the pending answers are out (it sees their rows).
Responses and notifications share a per-connection write lock. No handler exception reaches
the StreamServer: each is logged and answered with a terse internal error, never a traceback.
"""
import errno
import hmac
import json
import logging
import os
import socket
import stat
import struct
import time

import gevent
import gevent.event
import gevent.lock
import gevent.pool
from gevent.server import StreamServer

from rpc.admission import Admission, Limits
from rpc.connection import CallContext, Connection, Pending, Stream
from rpc.protocol import (AUTH_ERROR, INTERNAL_ERROR, INVALID_REQUEST, MAX_LINE, PARSE_ERROR,
                          UNAVAILABLE, RpcError, error_response, invalid_params, response)

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128


class RpcServer:
    """Serves a MethodTable on a Unix socket (mode 0600, same-uid peers) and optional TCP."""

    def __init__(self, methods, socket_path, tcp_port=None, tcp_token=None,
                 session_resolver=None, limits=None, public_methods=()):
        self.methods = methods
        self.socket_path = socket_path
        self.tcp_port = tcp_port
        self._tcp_token = tcp_token
        self.session_resolver = session_resolver
        self.public_methods = frozenset(public_methods)  # callable on TCP before `auth`
        self.stopping = gevent.event.Event()
        self.limits = limits or Limits()
        self.admission = Admission(self.limits)
        # Connection greenlets are bounded by admission (per transport), not by a pool:
        # a full pool stops accepting, and then nobody, the owner included, gets in.
        self._handlers = gevent.pool.Group()
        self._streams = gevent.pool.Group()
        self._sweeper = None
        self._servers = []
        self._bound_socket = False
        self._connections = set()
        self._active_calls = 0
        self._idle = gevent.event.Event()
        self._idle.set()
        self._uid = os.getuid()
        self._register_builtins()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self):
        """Bind both listeners synchronously and start accepting."""
        uds = StreamServer(bind_unix_socket(self.socket_path), self._handle_uds,
                           spawn=self._handlers.spawn)
        self._bound_socket = True  # from here on the path is ours to unlink
        uds.start()
        self._servers.append(uds)
        if self.tcp_port is not None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(('127.0.0.1', self.tcp_port))
            listener.listen(LISTEN_BACKLOG)
            tcp = StreamServer(listener, self._handle_tcp, spawn=self._handlers.spawn)
            tcp.start()
            self._servers.append(tcp)
        self._sweeper = self._streams.spawn(self._sweep_deadlines)

    @property
    def tcp_address(self):
        """'127.0.0.1:PORT' of the bound TCP listener, or None when TCP is off."""
        for server in self._servers[1:]:
            return '127.0.0.1:%d' % server.server_port
        return None

    def close_listeners(self):
        """Stop accepting and unlink the socket; connections being served go on."""
        for server in self._servers:
            try:
                server.close()
            except Exception:
                log.exception('closing a listener failed')
        try:
            # Never unlink a path another process serves on (a start that failed to bind).
            if self._bound_socket and os.path.exists(self.socket_path):
                os.unlink(self.socket_path)
        except OSError:
            log.exception('unlinking %s failed', self.socket_path)

    def stop(self, grace=5.0):
        """Close listeners, let calls in progress finish within `grace`, then close the rest."""
        self.close_listeners()
        self._idle.wait(timeout=grace)
        self.stopping.set()
        for conn in list(self._connections):
            conn.close()
        self._streams.kill(timeout=grace)
        self._handlers.kill(timeout=grace)

    def _sweep_deadlines(self):
        """Close TCP connections that did not `auth` in time and idle unsubscribed ones."""
        while not self.stopping.wait(self.limits.sweep_interval):
            for conn in list(self.admission.expired()):
                self.admission.release(conn)
                conn.close()

    # -- connections -------------------------------------------------------------------

    def _handle_uds(self, sock, _address):
        pid, uid = peer_credentials(sock)
        if uid != self._uid:
            log.warning('ipc_peer_uid_rejected', extra={'fields': {'uid': uid}})
            sock.close()
            return
        self._serve(Connection(sock, 'uds', self, peer_uid=uid, peer_pid=pid))

    def _handle_tcp(self, sock, _address):
        self._serve(Connection(sock, 'tcp', self))

    def _serve(self, conn):
        if not self.admission.admit(conn):
            conn.send(error_response(None, RpcError.of(
                UNAVAILABLE, 'busy', 'daemon busy: every %s connection is working'
                % conn.transport)))
            _discard_input(conn.sock)  # so the client's request does not meet a closed socket
            conn.close()
            return
        try:
            self._serve_admitted(conn)
        finally:
            self.admission.release(conn)

    def _serve_admitted(self, conn):
        self._connections.add(conn)
        rfile = conn.sock.makefile('rb')
        try:
            while not self.stopping.is_set():
                try:
                    line = rfile.readline(MAX_LINE + 2)
                except OSError:
                    break
                if not line:
                    break  # the client half-closed: answer nothing more, but keep streaming
                conn.last_activity = time.monotonic()
                if len(line) - line.endswith(b'\n') > MAX_LINE:
                    conn.wait_answers()
                    conn.send(error_response(None, RpcError.of(
                        INVALID_REQUEST, 'payload_too_large',
                        'line longer than %d bytes' % MAX_LINE)))
                    _discard_input(conn.sock)
                    return
                if not line.strip():
                    continue
                conn.in_call = True
                try:
                    if not self._handle_line(conn, line):
                        return
                finally:
                    conn.in_call = False
                    conn.last_activity = time.monotonic()
            if conn.stream is not None:
                # events.subscribe outlives the client's write side (socat -t 86400 …).
                conn.stream.join()
        finally:
            conn.wait_answers()  # what was accepted is answered before the socket closes
            self._connections.discard(conn)
            try:
                rfile.close()
            except OSError:
                pass
            conn.close()

    def _handle_line(self, conn, line):
        """Answer one line; False closes the connection."""
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            if not conn.authenticated:
                return False  # e.g. an HTTP request line aimed at the TCP port
            conn.send(error_response(None, RpcError.of(PARSE_ERROR, 'parse_error',
                                                       'parse error')))
            return True
        if not conn.authenticated:
            return self._handle_unauthenticated(conn, message)
        if isinstance(message, list):
            conn.wait_answers()
            return self._handle_batch(conn, message)
        if conn.answers_pending and not self._is_pipelined(message):
            conn.wait_answers()  # it must see what the pending requests wrote
        elif conn.answers_owed >= self.limits.max_pending:
            conn.wait_answers()  # a bound on the work one connection can queue
        answer, stream = self._call(conn, message)
        if conn.answers_pending or isinstance(answer, Pending):
            # Only a pipelined method gets here with answers pending: it never streams.
            conn.answer_in_order(_request_id(message), answer)
            return True
        if answer is not None and not conn.send(answer):
            if stream is not None and stream.cancel is not None:
                stream.cancel()
            return False
        if stream is not None:
            conn.stream = self._streams.spawn(self._run_stream, conn, stream)
        # A failed `auth` on TCP leaves the connection unauthenticated: close it.
        return conn.authenticated

    def _handle_unauthenticated(self, conn, message):
        if isinstance(message, dict) and message.get('method') in self.public_methods:
            # --public-health: answered before auth; the connection stays unauthenticated.
            answer, _stream = self._call(conn, message)
            if answer is not None:
                conn.send(answer)
            return True
        if not (isinstance(message, dict) and message.get('method') == 'auth'):
            request_id = message.get('id') if isinstance(message, dict) else None
            conn.send(error_response(request_id, RpcError.of(
                AUTH_ERROR, 'auth_required', 'missing bearer token')))
            return False
        answer, _stream = self._call(conn, message)
        if answer is not None:
            conn.send(answer)
        return conn.authenticated

    def _handle_batch(self, conn, batch):
        if not batch:
            conn.send(error_response(None, RpcError.of(INVALID_REQUEST, 'invalid_request',
                                                       'empty batch')))
            return True
        answers = []
        for message in batch:
            if isinstance(message, dict) and self._is_stream_method(message.get('method')):
                answer = error_response(message.get('id'), RpcError.of(
                    INVALID_REQUEST, 'invalid_request',
                    '%s must be sent alone, not in a batch' % message.get('method')))
            else:
                answer, _stream = self._call(conn, message)
            if isinstance(answer, Pending):
                answer = self.finish_pending(_request_id(message), answer)
            if answer is not None:
                answers.append(answer)
        if answers:
            return conn.send(answers)
        return True

    def _is_pipelined(self, message):
        try:
            return isinstance(message, dict) and self.methods.get(message.get('method')).pipelined
        except RpcError:
            return False

    def finish_pending(self, request_id, pending):
        """Wait for a Pending and return its answer (None for a notification).

        The call stays active from the moment _call returned the Pending until here, so a
        stopping server waits for it like for any running call.
        """
        try:
            result = pending.finish(pending.waitable.get())
        except RpcError as exc:
            return None if request_id is _NOTIFICATION else error_response(request_id, exc)
        except Exception:
            log.exception('completing a pipelined call failed')
            error = RpcError.of(INTERNAL_ERROR, 'internal', 'internal error')
            return None if request_id is _NOTIFICATION else error_response(request_id, error)
        finally:
            self._call_ended()
        return None if request_id is _NOTIFICATION else response(request_id, result)

    def _call_started(self):
        self._active_calls += 1
        self._idle.clear()

    def _call_ended(self):
        self._active_calls -= 1
        if self._active_calls == 0:
            self._idle.set()

    def _is_stream_method(self, name):
        try:
            return self.methods.get(name).stream
        except RpcError:
            return False

    def _run_stream(self, conn, stream):
        try:
            stream.run(conn)
        except Exception:
            log.exception('event stream failed')

    # -- calls -------------------------------------------------------------------------

    def _call(self, conn, message):
        """Run one request; return (answer or None for a notification, Stream or None)."""
        if not isinstance(message, dict):
            return error_response(None, _invalid_request('request must be an object')), None
        is_notification = 'id' not in message
        request_id = message.get('id')
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int, type(None))):
            return error_response(None, _invalid_request('invalid id')), None
        self._call_started()
        try:
            result = self._dispatch(conn, message)
        except RpcError as exc:
            return (None if is_notification else error_response(request_id, exc)), None
        except Exception:
            log.exception('rpc method %s failed', message.get('method'))
            error = RpcError.of(INTERNAL_ERROR, 'internal', 'internal error')
            return (None if is_notification else error_response(request_id, error)), None
        finally:
            self._call_ended()
        if isinstance(result, Pending):
            # Completed (and answered, unless a notification) by finish_pending, in order;
            # active until then.
            self._call_started()
            return result, None
        stream = None
        if isinstance(result, Stream):
            stream, result = result, result.result
        if is_notification:
            # A notification never streams (there is no answer to follow it).
            if stream is not None and stream.cancel is not None:
                stream.cancel()
            return None, None
        return response(request_id, result), stream

    def _dispatch(self, conn, message):
        if message.get('jsonrpc') != '2.0':
            raise _invalid_request("'jsonrpc' must be \"2.0\"")
        name = message.get('method')
        if not isinstance(name, str):
            raise _invalid_request("'method' must be a string")
        method = self.methods.get(name)
        params = message.get('params', {})
        if params is None:
            params = {}
        if isinstance(params, list):
            raise invalid_params('params must be an object, not an array')
        if not isinstance(params, dict):
            raise _invalid_request("'params' must be an object")
        ctx = CallContext(self, conn)
        if method.session == 'required' and ctx.session is None:
            raise RpcError.of(AUTH_ERROR, 'no_session', 'no session token')
        return method.call(ctx, params)

    # -- built-in methods --------------------------------------------------------------

    def _register_builtins(self):
        methods = self.methods

        @methods.method('rpc.list', result='{api, methods:[{name, help, params, result, session}]}')
        def rpc_list(ctx):
            """List every method with its one-line help, parameters and session requirement."""
            return {'api': 'v1', 'methods': methods.describe()}

        @methods.method('auth', result='{ok}')
        def auth(ctx, token: str):
            """Authenticate a TCP connection with the local token (accepted on the Unix socket)."""
            expected = self._tcp_token or ''
            if not (expected and hmac.compare_digest(token.encode('utf-8'),
                                                      expected.encode('utf-8'))):
                log.warning('ipc_auth_failed', extra={'fields': {'transport': ctx.conn.transport}})
                if ctx.conn.transport == 'tcp':
                    ctx.conn.authenticated = False
                raise RpcError.of(AUTH_ERROR, 'invalid_token', 'invalid bearer token')
            ctx.conn.authenticated = True
            return {'ok': True}


def _discard_input(sock, limit=4 * MAX_LINE, seconds=1.0):
    """Half-close, then read and drop what the client still sends for a moment.

    Closing a socket with unread input makes the kernel send a reset, which can destroy
    the error answer before the client reads it.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(seconds)
        while limit > 0:
            chunk = sock.recv(65536)
            if not chunk:
                break
            limit -= len(chunk)
    except OSError:
        pass


_NOTIFICATION = object()  # the request id of a request without one


def _request_id(message):
    return message.get('id', _NOTIFICATION) if isinstance(message, dict) else None


def _invalid_request(message):
    return RpcError.of(INVALID_REQUEST, 'invalid_request', message)


def peer_credentials(sock):
    """(pid, uid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize('3i'))
    pid, uid, _gid = struct.unpack('3i', creds)
    return pid, uid


def is_socket_live(path, timeout=2.0):
    """True when something accepts connections on the Unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_unix_socket(path):
    """A listening Unix socket at `path`, mode 0600 from the instant it exists.

    A file already at `path` is unlinked only when nothing answers on it: the caller holds
    the daemon's lock, so a live answer means a foreign process and we refuse to take over.
    """
    if os.path.lexists(path):
        if is_socket_live(path):
            raise OSError(errno.EADDRINUSE, 'a live process answers on %s' % path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(previous)
    try:
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)  # second guard; the umask already did it
    except OSError as exc:
        log.warning('uds_chmod_failed', extra={'fields': {'err': str(exc)}})
    sock.listen(LISTEN_BACKLOG)
    return sock
