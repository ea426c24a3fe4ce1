"""The machine's limits, measured in the same run as meshd's figures (bench/run.py):

  (a) a bare gevent newline-JSON echo server on a Unix socket, a Python client at c=1:
      round trips/s and p50, what daemon.health, inbox.list and send cost at the least;
  (b) a bare SQLite commit loop in WAL mode, one small INSERT per transaction, at
      synchronous=FULL and NORMAL: commits/s, what one-in-flight `send` costs at the least;
  (c) a bare gevent-websocket echo server, a websocket-client client at c=1: round trips/s
      and p50, the floor of a DM's hops through the broker;
  (d) the interpreter's start: `python -c pass`, `python -c "import gevent"` (and, for
      reading the CLI's figures, `import meshd.cli`): the floor of every meshd process.

Each measurement runs for a fixed time (throughputs) or once (process starts) per call;
bench/run.py calls it once per repetition.
"""
import os
import select
import sqlite3
import subprocess
import sys
import tempfile
import time

from bench_common import ROOT, BenchError, LineClient, latency_summary

HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS = os.path.join(HERE, 'bench_servers.py')
WS_PAYLOAD = ('{"type":"send","id":"m-000001","client_message_id":"m-000001",'
              '"targetSpec":"%s","priority":"next","nonce":"%s","ciphertext":"%s"}'
              % ('a' * 64, 'n' * 32, 'c' * 120))


class ServerProcess:
    """One of bench_servers.py's servers as a child process; stop() closes its stdin."""

    def __init__(self, args):
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, SERVERS] + args, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.errors)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = (self.proc.stdout.readline().decode('utf-8', 'replace').strip()
                if ready else '')
        if not line:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.errors.seek(0)
            err = self.errors.read().decode('utf-8', 'replace')[-800:]
            self.stop()
            raise BenchError('bench_servers.py %s did not start: %s' % (' '.join(args), err))
        self.ready = line

    @property
    def pid(self):
        return self.proc.pid

    def rss(self):
        """Resident memory of the server (a bare gevent process), in MiB."""
        import psutil
        return psutil.Process(self.proc.pid).memory_info().rss / (1024.0 * 1024.0)

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.errors):
            try:
                pipe.close()
            except OSError:
                pass


def round_trips(call, duration, warmup=100):
    """Call `call()` back to back for `duration` seconds; rate and latency percentiles."""
    for _ in range(warmup):
        call()
    samples = []
    clock = time.perf_counter
    start = clock()
    end = start + duration
    now = start
    while now < end:
        before = now
        call()
        now = clock()
        samples.append(now - before)
    elapsed = now - start
    return dict(latency_summary(samples), rate=len(samples) / elapsed, elapsed=elapsed)


def unix_echo(directory, duration):
    """(a): the bare echo server and the bench's own client, one request in flight."""
    path = os.path.join(directory, 'echo.sock')
    server = ServerProcess(['unix-echo', path])
    try:
        with LineClient(path, timeout=30) as client:
            def call():
                answer = client.request('daemon.health')
                if 'result' not in answer:
                    raise BenchError('echo answered %r' % (answer,))
            return dict(round_trips(call, duration), rss=server.rss())
    finally:
        server.stop()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def ws_echo(duration):
    """(c): the bare gevent-websocket echo server, websocket-client at c=1."""
    import websocket
    server = ServerProcess(['ws-echo'])
    try:
        port = int(server.ready.split()[1])
        ws = websocket.create_connection('ws://127.0.0.1:%d/ws' % port, timeout=30)
        try:
            def call():
                ws.send(WS_PAYLOAD)
                if ws.recv() != WS_PAYLOAD:
                    raise BenchError('the WebSocket echo answered something else')
            return dict(round_trips(call, duration), rss=server.rss())
        finally:
            ws.close()
    finally:
        server.stop()


def sqlite_commits(directory, synchronous, duration):
    """(b): one small INSERT per transaction in WAL mode, as fast as the disk commits."""
    path = os.path.join(directory, 'limit-%s.db' % synchronous.lower())
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        db.execute('PRAGMA journal_mode=WAL')
        db.execute('PRAGMA synchronous=%s' % synchronous)
        db.execute('CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)')
        body = 'x' * 200
        clock = time.perf_counter
        count = 0
        start = clock()
        end = start + duration
        now = start
        while now < end:
            db.execute('BEGIN')
            db.execute('INSERT INTO t (body) VALUES (?)', (body,))
            db.execute('COMMIT')
            count += 1
            now = clock()
        elapsed = now - start
        return {'rate': count / elapsed, 'commits': count, 'elapsed': elapsed,
                'commit_s': elapsed / count}
    finally:
        db.close()
        for suffix in ('', '-wal', '-shm'):
            try:
                os.unlink(path + suffix)
            except FileNotFoundError:
                pass


def process_wall(argv, env=None, cwd=None, timeout=120):
    """Wall seconds of one process from start to exit; BenchError when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=env, cwd=cwd, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError('%s exited %d: %s' % (' '.join(argv), proc.returncode,
                                               proc.stderr.decode('utf-8', 'replace')[-800:]))
    return wall


INTERPRETER_STARTS = (
    ('pass', 'pass'),
    ('gevent', 'import gevent'),
    ('meshd_cli', 'import meshd.cli'),
    ('meshd_daemon', 'from gevent import monkey; monkey.patch_all(); import meshd.daemon'),
)


def interpreter_starts(warmup=False):
    """(d): wall seconds of each bare start (meshd.cli from this checkout)."""
    results = {}
    for name, code in INTERPRETER_STARTS:
        argv = [sys.executable, '-c', code]
        env = dict(os.environ, PYTHONPATH=ROOT) if 'meshd' in code else None
        if warmup:
            process_wall(argv, env=env, cwd='/')
        results[name] = process_wall(argv, env=env, cwd='/')
    return results
