"""Benchmark: how long other calls stall while the daemon prunes a large inbox.

Writes N inbox rows older than the 30-day retention into a fresh daemon database, starts
the daemon (it prunes once at start), and calls `daemon.version` back to back on one
connection until the prune and its vacuum have completed. Reports the longest and the 99th-percentile
answer time while the prune ran (the target is under 50 ms: pruning goes in batches of
500 rows through the group writer), how long the prune took, and the database file size
before and after (incremental vacuum gives the freed pages back).
Usage: python3 bench/prune_stall.py [N]   (default 100000)
"""
from gevent import monkey; monkey.patch_all()  # noqa: E702

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rpc.client import RpcClient, RpcConnectionError  # noqa: E402
from storage import migrate  # noqa: E402
from storage.migrations import MIGRATIONS  # noqa: E402
from storage.models import Inbox, database  # noqa: E402
from storage.store import Store  # noqa: E402
from meshd.clock import now_ms  # noqa: E402

DAY_MS = 24 * 3600 * 1000


def fill(path, count):
    store = Store(database).open_sqlite(path)
    migrate.migrate(store, MIGRATIONS, incremental_vacuum=True)
    old = now_ms() - 31 * DAY_MS
    rows = [{'id': str(uuid.uuid4()), 'client_message_id': str(uuid.uuid4()), 'mesh': 'team',
             'sender_pubkey': 'ab' * 32, 'sender_name': 'peer', 'body': 'x' * 300,
             'received_at': old + i, 'recipient_pubkey': 'cd' * 32, 'recipient_kind': 'member'}
            for i in range(count)]
    with store.writing():
        for start in range(0, count, 1000):
            Inbox.insert_many(rows[start:start + 1000]).execute()
    store.database.execute_sql('PRAGMA wal_checkpoint(TRUNCATE)')
    store.close()


def log_times(path, name):
    """The ts of JSON log lines named `name`, as epoch seconds."""
    import datetime
    stamps = []
    with open(path) as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get('msg') == name:
                moment = datetime.datetime.fromisoformat(entry['ts'].replace('Z', '+00:00'))
                stamps.append(moment.timestamp())
    return stamps


def main(count):
    base = tempfile.mkdtemp(prefix='meshd-bench-', dir='/tmp')
    home = os.path.join(base, 'home')
    daemon_dir = os.path.join(home, 'daemon')
    os.makedirs(daemon_dir, mode=0o700)
    db_path = os.path.join(daemon_dir, 'meshd.db')
    try:
        fill(db_path, count)
        size_before = os.path.getsize(db_path)
        out = open(os.path.join(base, 'out.log'), 'w')
        env = dict(os.environ, MESHD_HOME=home, PYTHONPATH=ROOT)
        started = time.time()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'meshd.py'), 'daemon', 'up',
                                 '--foreground', '--no-tcp'], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        socket_path = os.path.join(daemon_dir, 'meshd.sock')
        samples = []   # (time sent, seconds to answer)
        client = None
        while time.time() - started < 120:
            if client is None:
                try:
                    client = RpcClient(socket_path=socket_path, timeout=30).connect()
                except RpcConnectionError:
                    time.sleep(0.01)
                    continue
            sent = time.time()
            client.call('daemon.version')
            samples.append((sent, time.time() - sent))
            if log_times(os.path.join(base, 'out.log'), 'database_pages_returned') and \
                    len(samples) % 200 == 0:
                break
        client.close()
        completed = log_times(os.path.join(base, 'out.log'), 'database_pages_returned')
        proc.terminate()
        proc.wait(30)
        out.close()
        end = completed[0] if completed else time.time()
        during = sorted(seconds for sent, seconds in samples if sent <= end)
        if not during:
            print('the prune finished before the socket answered; try a larger N')
            return
        p99 = during[min(len(during) - 1, int(len(during) * 0.99))]
        store = Store(database).open_sqlite(db_path)
        store.database.execute_sql('PRAGMA wal_checkpoint(TRUNCATE)')
        store.close()
        print('rows pruned: %d; prune ran %.2f s after start' % (count, end - started))
        print('daemon.version while pruning: %d calls, longest %.1f ms, p99 %.1f ms'
              % (len(during), during[-1] * 1000, p99 * 1000))
        if os.environ.get('PRUNE_STALL_TRACE'):
            slow = [(round(sent - started, 2), round(sec * 1000)) for sent, sec in samples
                    if sec > 0.05]
            print('slow answers (s after start, ms):', slow)
        print('database file: %.1f MB before, %.1f MB after'
              % (size_before / 1e6, os.path.getsize(db_path) / 1e6))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100000)
