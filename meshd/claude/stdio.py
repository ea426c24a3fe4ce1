"""JSON-RPC 2.0 over stdin/stdout, one message per line, on gevent (MCP's stdio transport).

The same framing and method table as the daemon's socket (rpc/): requests are looked up in a
MethodTable, checked against the handler's signature, and answered with rpc.protocol's
messages. What differs is the peer: one client on a pipe, requests served concurrently (a
slow tool call never delays a notification or a ping), `notifications/cancelled` stops a
request without an answer, and stdout carries protocol lines only, each flushed as soon as
it is written (a buffered line is a message the client never reads; field-lessons 11d).
"""
import json
import logging

import gevent
import gevent.event
from gevent.fileobject import FileObjectPosix
from rpc.connection import LineWriter
from rpc.protocol import (INTERNAL_ERROR, INVALID_REQUEST, MAX_LINE, PARSE_ERROR, RpcError,
                          error_response, invalid_params, response)

log = logging.getLogger(__name__)


class RequestContext:
    """What a handler sees: the request id (None for a notification)."""

    def __init__(self, request_id):
        self.request_id = request_id


class StdioPeer:
    """Serves `methods` (an rpc.methods.MethodTable) to the client on `infd`/`outfd`;
    requests run in `pool` (Supervisor.pool: bounded, crashes logged)."""

    def __init__(self, methods, pool, infd=0, outfd=1):
        self.methods = methods
        self.pool = pool
        self._in = FileObjectPosix(infd, 'rb', close=False)
        self._out = FileObjectPosix(outfd, 'wb', close=False)
        self._requests = {}                 # request id -> greenlet serving it
        self.closed = gevent.event.Event()  # stdin ended or stdout broke
        self._writer = LineWriter(self._write_and_flush, self.closed)

    def _write_and_flush(self, data):
        self._out.write(data)
        self._out.flush()

    def send(self, message):
        """Write one message as a line and flush it; False once the client is gone."""
        return self._writer.send(message)

    def serve(self):
        """Read and answer until stdin ends; requests still running are waited for."""
        try:
            while not self.closed.is_set():
                line = self._in.readline(MAX_LINE + 1)
                if not line:
                    break
                if len(line) > MAX_LINE and not line.endswith(b'\n'):
                    self._skip_rest_of_line()
                    self.send(error_response(None, RpcError.of(
                        INVALID_REQUEST, 'payload_too_large',
                        'line longer than %d bytes' % MAX_LINE)))
                    continue
                if line.strip():
                    self._handle_line(line)
        except (OSError, ValueError):
            pass    # stdin closed under us
        finally:
            gevent.joinall(list(self._requests.values()), timeout=5)
            self.closed.set()

    def _skip_rest_of_line(self):
        while True:
            chunk = self._in.readline(MAX_LINE)
            if not chunk or chunk.endswith(b'\n'):
                return

    def _handle_line(self, line):
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            self.send(error_response(None, RpcError.of(PARSE_ERROR, 'parse_error',
                                                       'parse error')))
            return
        if not isinstance(message, dict):
            self.send(error_response(None, RpcError.of(
                INVALID_REQUEST, 'invalid_request', 'one JSON-RPC object per line')))
            return
        if 'method' not in message:
            return      # an answer to a request of ours: we send none
        if 'id' not in message:
            self._run(message, None)      # a notification: quick, in order, never answered
            return
        request_id = message['id']
        if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
            self.send(error_response(None, RpcError.of(INVALID_REQUEST, 'invalid_request',
                                                       'invalid id')))
            return
        greenlet = self.pool.spawn(self._answer, request_id, message)
        self._requests[request_id] = greenlet
        greenlet.link(lambda _g: self._requests.pop(request_id, None))

    def _answer(self, request_id, message):
        try:
            result = self._run(message, request_id)
        except RpcError as exc:
            self.send(error_response(request_id, exc))
            return
        self.send(response(request_id, result))

    def _run(self, message, request_id):
        """Call the method of `message`; RpcError for the client, other errors logged."""
        try:
            if message.get('jsonrpc') != '2.0':
                raise RpcError.of(INVALID_REQUEST, 'invalid_request',
                                  "'jsonrpc' must be \"2.0\"")
            method = self.methods.get(message.get('method'))
            params = message.get('params')
            params = {} if params is None else params
            if not isinstance(params, dict):
                raise invalid_params('params must be an object')
            return method.call(RequestContext(request_id), params)
        except RpcError:
            if request_id is None:
                return None
            raise
        except Exception:
            log.exception('mcp method %s failed', message.get('method'))
            if request_id is None:
                return None
            raise RpcError.of(INTERNAL_ERROR, 'internal', 'internal error')

    def cancel(self, request_id):
        """Stop serving `request_id`; the client expects no answer to it."""
        greenlet = self._requests.pop(request_id, None)
        if greenlet is not None:
            greenlet.kill(block=False)
