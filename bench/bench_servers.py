"""The bare servers bench/run.py measures the machine's limits with, each run as its own process
(as the daemon and the broker are), on the same gevent and gevent-websocket as meshd:

  python3 bench/bench_servers.py unix-echo PATH   newline-JSON echo on a Unix socket
  python3 bench/bench_servers.py ws-echo          WebSocket echo on 127.0.0.1, a free port

Each prints one line when it listens (`READY` or `PORT n`) and exits when its stdin closes,
so it never outlives the bench that started it.
"""
from gevent import monkey; monkey.patch_all()  # noqa: E702

import json
import os
import socket
import sys

import gevent
from gevent.server import StreamServer


def _encode(obj):
    return (json.dumps(obj, separators=(',', ':'), ensure_ascii=False) + '\n').encode('utf-8')


def _echo_connection(sock, _address):
    """Read a JSON-RPC line, parse it, answer it: what any method costs at the least."""
    rfile = sock.makefile('rb')
    try:
        while True:
            line = rfile.readline()
            if not line:
                return
            message = json.loads(line)
            sock.sendall(_encode({'jsonrpc': '2.0', 'id': message.get('id'),
                                  'result': {'ok': True}}))
    except OSError:
        return
    finally:
        rfile.close()
        sock.close()


def unix_echo(path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    server = StreamServer(listener, _echo_connection)
    server.start()
    return server, 'READY'


def _ws_app(environ, start_response):
    ws = environ.get('wsgi.websocket')
    if ws is None:
        start_response('404 Not Found', [('Content-Type', 'text/plain')])
        return [b'not found']
    while True:
        message = ws.receive()
        if message is None:
            return []
        ws.send(message)


def ws_echo():
    from gevent.pywsgi import WSGIServer
    from geventwebsocket.handler import WebSocketHandler
    server = WSGIServer(('127.0.0.1', 0), _ws_app, handler_class=WebSocketHandler, log=None)
    server.start()
    return server, 'PORT %d' % server.server_port


def main(argv):
    if argv[:1] == ['unix-echo'] and len(argv) == 2:
        server, ready = unix_echo(argv[1])
    elif argv == ['ws-echo']:
        server, ready = ws_echo()
    else:
        sys.stderr.write(__doc__)
        return 2
    sys.stdout.write(ready + '\n')
    sys.stdout.flush()
    # Exit when the parent closes our stdin (or dies): read it in a thread pool so the hub
    # keeps serving meanwhile.
    gevent.get_hub().threadpool.spawn(sys.stdin.buffer.read).get()
    server.stop(timeout=1)
    return 0


if __name__ == '__main__':
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
