"""Benchmark: DMs per second from one daemon to another through a local meshd broker.

Starts `meshd broker --rate-limit off` and two daemons (alice, bob) on loopback in a
temporary directory, accepts N DMs on alice with pipelined `send` calls, and reports
  - accept rate: how fast `send` commits rows to the outbox,
  - delivery rate: from the first accept until bob's inbox holds all N rows,
for `--durability full` (the default) and `normal`. claudemesh's one-row drain with 500 ms
sleeps tops out near 72 messages/s on a 2-core machine; meshd keeps 16 sends in flight
per link. Usage: python3 bench/drain_throughput.py [N]
"""
from gevent import monkey; monkey.patch_all()  # noqa: E702

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rpc.client import RpcClient  # noqa: E402
from rpc.protocol import encode, request  # noqa: E402

ENTRY = [sys.executable, os.path.join(ROOT, 'meshd.py')]


def meshd(home, *args):
    env = dict(os.environ, MESHD_HOME=home)
    return subprocess.run(ENTRY + list(args), env=env, check=True, capture_output=True,
                          text=True).stdout


def free_port():
    probe = socket.socket()
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def wait(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError('timed out')


def run(count, durability):
    base = tempfile.mkdtemp(prefix='meshd-bench-', dir='/tmp')
    port = free_port()
    url = 'ws://127.0.0.1:%d/ws' % port
    db = os.path.join(base, 'broker.db')
    broker = subprocess.Popen(ENTRY + ['broker', '--listen', '127.0.0.1:%d' % port, '--db', db,
                                       '--rate-limit', 'off'],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    homes = {name: os.path.join(base, name) for name in ('alice', 'bob')}
    try:
        wait(lambda: _listening(port))
        meshd(base, 'broker-admin', 'create-mesh', '--name', 'bench', '--db', db)
        link = meshd(base, 'broker-admin', 'invite', '--mesh', 'bench', '--broker-url', url,
                     '--max-uses', '2', '--db', db).strip().splitlines()[-1]
        for name, home in homes.items():
            meshd(home, 'join', link, '--name', name)
            meshd(home, 'daemon', 'up', '--no-tcp', '--durability', durability)
        sockets = {name: os.path.join(home, 'daemon', 'meshd.sock')
                   for name, home in homes.items()}

        def call(name, method, params=None):
            with RpcClient(socket_path=sockets[name], timeout=30) as client:
                return client.call(method, params)

        for name in homes:
            wait(lambda: call(name, 'daemon.health')['brokers']['bench']['status'] == 'open')
        bob_key = json.load(open(os.path.join(homes['bob'], 'config.json')))['meshes'][0]['pubkey']
        client = RpcClient(socket_path=sockets['alice'], timeout=60).connect()
        start = time.monotonic()
        batch = 200
        for first in range(0, count, batch):
            lines = b''.join(encode(request(n, 'send', {'to': bob_key, 'message': 'm%06d' % n}))
                             for n in range(first, min(count, first + batch)))
            client.send_raw(lines)
            for _ in range(first, min(count, first + batch)):
                answer = client.read_message()
                assert 'result' in answer, answer
        accepted = time.monotonic() - start
        client.close()
        # Count rows in bob's database directly: polling inbox.list would load bob's daemon.
        wait(lambda: _count(homes['bob']) >= count, timeout=600)
        delivered = time.monotonic() - start
        return accepted, delivered
    finally:
        for home in homes.values():
            subprocess.run(ENTRY + ['daemon', 'down'], env=dict(os.environ, MESHD_HOME=home),
                           capture_output=True)
        broker.send_signal(signal.SIGTERM)
        broker.wait()
        shutil.rmtree(base, ignore_errors=True)


def _listening(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


def _count(home):
    import sqlite3
    db = sqlite3.connect(os.path.join(home, 'daemon', 'meshd.db'), timeout=10)
    try:
        return db.execute('SELECT count(*) FROM inbox').fetchone()[0]
    finally:
        db.close()


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print('%d DMs, alice → bob through a local meshd broker' % count)
    for durability in ('full', 'normal'):
        accepted, delivered = run(count, durability)
        print('durability=%-6s accept %7.0f msg/s   end-to-end %7.0f msg/s   (%.1f s)'
              % (durability, count / accepted, count / delivered, delivered))


if __name__ == '__main__':
    main()
