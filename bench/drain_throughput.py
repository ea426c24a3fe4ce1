"""Benchmark: DMs per second from one daemon to another through a local meshd broker.

Starts `meshd broker --rate-limit off` and two daemons (alice, bob) on loopback in a
temporary directory, accepts N DMs on alice with pipelined `send` calls, and reports
  - accept rate: how fast `send` commits rows to the outbox,
  - delivery rate: from the first accept until bob's inbox holds all N rows,
  - drain rate: the same with bob offline, until the broker acked all N (alice's drain alone),
for `--durability full` (the default) and `normal`. claudemesh's one-row drain with 500 ms
sleeps tops out near 72 messages/s on a 2-core machine; meshd keeps 16 sends in flight
per link. Usage: python3 bench/drain_throughput.py [N [CLIENTS]]; CLIENTS connections
(default 1) share the N `send` calls, each pipelining them.
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

import gevent

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


def run(count, durability, clients, drain_only=False):
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
        running = ['alice'] if drain_only else list(homes)
        for name, home in homes.items():
            meshd(home, 'join', link, '--name', name)
            if name in running:
                meshd(home, 'daemon', 'up', '--no-tcp', '--durability', durability)
        sockets = {name: os.path.join(home, 'daemon', 'meshd.sock')
                   for name, home in homes.items()}

        def call(name, method, params=None):
            with RpcClient(socket_path=sockets[name], timeout=30) as client:
                return client.call(method, params)

        for name in running:
            wait(lambda: call(name, 'daemon.health')['brokers']['bench']['status'] == 'open')
        bob_key = json.load(open(os.path.join(homes['bob'], 'config.json')))['meshes'][0]['pubkey']
        start = time.monotonic()
        senders = [gevent.spawn(_send_all, sockets['alice'], bob_key, range(n, count, clients))
                   for n in range(clients)]
        gevent.joinall(senders, raise_error=True)
        accepted = time.monotonic() - start
        # Count rows in bob's database directly: polling inbox.list would load bob's daemon.
        if drain_only:
            # bob stays offline: the broker stores the DMs, so this times alice's drain alone.
            wait(lambda: _count(homes['alice'], "SELECT count(*) FROM outbox WHERE status = 'done'")
                 >= count, timeout=600)
        else:
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


def _send_all(socket_path, bob_key, numbers):
    """One client connection: pipelined `send` calls, 200 lines at a time."""
    numbers = list(numbers)
    client = RpcClient(socket_path=socket_path, timeout=60).connect()
    try:
        for first in range(0, len(numbers), 200):
            chunk = numbers[first:first + 200]
            client.send_raw(b''.join(
                encode(request(n, 'send', {'to': bob_key, 'message': 'm%06d' % n}))
                for n in chunk))
            for _ in chunk:
                answer = client.read_message()
                assert 'result' in answer, answer
    finally:
        client.close()


def _listening(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


def _count(home, sql='SELECT count(*) FROM inbox'):
    import sqlite3
    db = sqlite3.connect(os.path.join(home, 'daemon', 'meshd.db'), timeout=10)
    try:
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    print('%d DMs, alice → bob through a local meshd broker, %d client connection(s)'
          % (count, clients))
    for durability in ('full', 'normal'):
        accepted, delivered = run(count, durability, clients)
        print('durability=%-6s accept %7.0f msg/s   end-to-end %7.0f msg/s   (%.1f s)'
              % (durability, count / accepted, count / delivered, delivered))
    for durability in ('full', 'normal'):
        accepted, drained = run(count, durability, clients, drain_only=True)
        print('durability=%-6s accept %7.0f msg/s   drained to the broker (bob offline) '
              '%7.0f msg/s' % (durability, count / accepted, count / drained))


if __name__ == '__main__':
    main()
