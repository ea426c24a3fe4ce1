"""Benchmark: the meshd broker alone, with raw protocol clients (the field-lesson 80 baseline).

Starts an in-process BrokerServer (`--rate-limit off`, SQLite by default or the PostgreSQL URL
given as MESHD_BENCH_PG_URL) on loopback, connects P member peers, and has each send M DMs to
the next peer, acking every push. Reports send→push latency percentiles, throughput, and checks
that every DM arrived exactly once (claudemesh's v0.1.0 load test: 100×100 → 99.8 % delivered,
p50 2.7 s). Usage: python3 bench/broker_fanout.py [PEERS] [MESSAGES_PER_PEER]
"""
from gevent import monkey; monkey.patch_all()  # noqa: E702

import json
import os
import shutil
import sys
import tempfile
import time

import gevent
import websocket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from meshd import crypto  # noqa: E402
from meshd.broker import admin, protocol, store  # noqa: E402
from meshd.broker.server import BrokerServer  # noqa: E402

DEADLINE = 300


def _hello(mesh_id, member_id, pub, sec):
    ts = protocol.now_ms()
    return {'type': 'hello', 'meshId': mesh_id, 'memberId': member_id, 'pubkey': pub,
            'sessionId': 'bench-%s' % pub[:12], 'pid': os.getpid(), 'cwd': '/tmp',
            'timestamp': ts,
            'signature': crypto.sign_hex(sec, crypto.member_hello_text(mesh_id, member_id, pub, ts))}


def main(peers=20, per_peer=50):
    tmp = tempfile.mkdtemp(prefix='meshd-', dir='/tmp')
    db = os.environ.get('MESHD_BENCH_PG_URL') or os.path.join(tmp, 'broker.db')
    if db.startswith('postgresql://'):
        store.open_store(db, migrate_schema=False)
        store.drop_all()
        store.close_store()
    server = BrokerServer(listen='127.0.0.1:0', db=db, rate_limit='off',
                          max_connections_per_mesh=peers + 10)
    server.start()
    try:
        with store.connection():
            mesh = admin.create_mesh('bench')
            idents = []
            for i in range(peers):
                pub, sec = crypto.generate_keypair()
                member = admin.add_member(mesh['slug'], pub, 'peer%d' % i)
                idents.append((member['memberId'], pub, sec))
        sockets = []
        for member_id, pub, sec in idents:
            ws = websocket.create_connection(server.url, timeout=DEADLINE)
            ws.send(json.dumps(_hello(mesh['id'], member_id, pub, sec)))
            while json.loads(ws.recv())['type'] != 'hello_ack':
                pass
            sockets.append(ws)
        sent_at, latencies, seen = {}, [], {}

        def reader(index):
            ws = sockets[index]
            want = per_peer
            while want:
                frame = json.loads(ws.recv())
                if frame.get('type') != 'push' or frame.get('subtype') == 'system':
                    continue
                cmid = frame['client_message_id']
                seen[cmid] = seen.get(cmid, 0) + 1
                latencies.append(time.monotonic() - sent_at[cmid])
                ws.send(json.dumps({'type': 'client_ack', 'clientMessageId': cmid,
                                    'brokerMessageId': frame['messageId']}))
                want -= 1

        def writer(index):
            ws = sockets[index]
            recipient = idents[(index + 1) % peers][1]
            for n in range(per_peer):
                cmid = 'm-%d-%d' % (index, n)
                nonce, ct = crypto.seal_dm(b'bench %d' % n, recipient, idents[index][2])
                sent_at[cmid] = time.monotonic()
                ws.send(json.dumps({'type': 'send', 'id': cmid, 'client_message_id': cmid,
                                    'targetSpec': recipient, 'priority': 'next',
                                    'nonce': nonce, 'ciphertext': ct}))

        start = time.monotonic()
        readers = [gevent.spawn(reader, i) for i in range(peers)]
        writers = [gevent.spawn(writer, i) for i in range(peers)]
        gevent.joinall(writers + readers, timeout=DEADLINE, raise_error=True)
        elapsed = time.monotonic() - start
        total = peers * per_peer
        latencies.sort()
        duplicates = sum(1 for c in seen.values() if c > 1)
        print('peers=%d messages=%d delivered=%d duplicates=%d in %.2fs (%.0f msg/s)'
              % (peers, total, len(seen), duplicates, elapsed, total / elapsed))
        if latencies:
            print('latency p50=%.3fs p95=%.3fs max=%.3fs'
                  % (latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95)],
                     latencies[-1]))
        for ws in sockets:
            ws.close()
        return 0 if len(seen) == total and not duplicates else 1
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    args = [int(a) for a in sys.argv[1:3]]
    sys.exit(main(*args))
