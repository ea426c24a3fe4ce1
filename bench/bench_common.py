"""What bench/run.py's parts share: a minimal newline-JSON client, waiting with deadlines,
percentiles, and the one error a stage raises.

The client is deliberately the same code for the bare echo server (the machine's limit) and
for the daemon, so that the two figures differ only by what the server does. It runs on
plain blocking sockets: the bench process is never patched by gevent, so timing a child
process or a round trip adds nothing of gevent's hub.
"""
import itertools
import json
import math
import os
import socket
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchError(Exception):
    """A stage could not run or found something wrong (never a speed: speeds are reported)."""


def encode(obj):
    """One compact JSON line, as the daemon's own encoder writes it."""
    return (json.dumps(obj, separators=(',', ':'), ensure_ascii=False) + '\n').encode('utf-8')


class LineClient:
    """One connection to a newline-JSON-RPC Unix socket, blocking, one request at a time
    (or pipelined with send_lines/read)."""

    def __init__(self, path, timeout=60.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.rfile = self.sock.makefile('rb')
        self.ids = itertools.count(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        for closable in (self.rfile, self.sock):
            try:
                closable.close()
            except OSError:
                pass

    def line(self, method, params=None):
        message = {'jsonrpc': '2.0', 'id': next(self.ids), 'method': method}
        if params is not None:
            message['params'] = params
        return encode(message)

    def send_lines(self, data):
        self.sock.sendall(data)

    def read(self, timeout=None):
        """The next message (an answer or a notification); BenchError at end of stream."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            data = self.rfile.readline()
        except socket.timeout:
            raise BenchError('no answer from %s in time' % self.path)
        if not data:
            raise BenchError('%s closed the connection' % self.path)
        return json.loads(data)

    def request(self, method, params=None):
        """Send one request, return its answer (notifications in between are dropped)."""
        self.sock.sendall(self.line(method, params))
        while True:
            message = self.read()
            if 'id' in message:
                return message

    def call(self, method, params=None):
        answer = self.request(method, params)
        if 'error' in answer:
            raise BenchError('%s failed: %s' % (method, json.dumps(answer['error'])))
        return answer.get('result')


def try_call(path, method, params=None, timeout=2.0):
    """The result of one call, or None when nothing answers on `path` yet."""
    if not os.path.exists(path):
        return None
    try:
        with LineClient(path, timeout=timeout) as client:
            answer = client.request(method, params)
    except (OSError, BenchError, ValueError):
        return None
    return answer.get('result') if 'result' in answer else None


def wait_until(predicate, timeout, what, interval=0.05, alive=None):
    """Poll `predicate` until it returns a true value (returned); BenchError at the deadline,
    or as soon as `alive()` (when given) says the process we wait on is gone."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            raise BenchError('gave up waiting for %s: the process exited' % what)
        if time.monotonic() > deadline:
            raise BenchError('timed out after %.0f s waiting for %s' % (timeout, what))
        time.sleep(interval)


def percentile(sorted_values, fraction):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values) - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(samples):
    """p50/p90/p99/max (seconds) of a list of latencies."""
    ordered = sorted(samples)
    return {'n': len(ordered), 'p50': percentile(ordered, 0.50), 'p90': percentile(ordered, 0.90),
            'p99': percentile(ordered, 0.99), 'max': ordered[-1] if ordered else None,
            'mean': statistics.mean(ordered) if ordered else None}


def free_port():
    probe = socket.socket()
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
    probe.close()
    return port
