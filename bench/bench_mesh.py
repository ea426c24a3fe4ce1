"""A real meshd on loopback for bench/run.py: `meshd broker` and daemons as a user starts them.

Everything lives in one short directory under /tmp. The broker is `meshd broker --rate-limit
off` on a free loopback port; the mesh is made with `meshd broker-admin create-mesh` and an
invite, members join with `meshd join`, and daemons start detached with `meshd daemon up
--no-tcp` (no TCP listener: other daemons on this machine may hold the default port).
cleanup() stops every daemon and server this harness started, by the pids it recorded, and
removes the directory; it runs on failure and on Ctrl-C too.
"""
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import psutil

from bench_common import ROOT, BenchError, LineClient, free_port, try_call, wait_until

MIB = 1024.0 * 1024.0


def meshd_command():
    """(argv prefix, description, notes) of the meshd that this interpreter's user runs.

    In a virtualenv with meshd installed from this checkout, its console script beside
    sys.executable, or `python -m meshd` when that script is stale (it skips meshd.entry,
    which decides whether a command patches gevent); otherwise this checkout's meshd.py
    run by sys.executable (the Debian interpreter's /usr/bin/meshd would run the packaged
    copy in /usr/share/meshd, not this checkout).
    """
    notes = []
    script = os.path.join(os.path.dirname(sys.executable), 'meshd')
    if sys.prefix != sys.base_prefix and os.path.isfile(script):
        probe = subprocess.run([sys.executable, '-c', 'import meshd; print(meshd.__file__)'],
                               capture_output=True, text=True, cwd='/')
        where = probe.stdout.strip()
        if probe.returncode == 0 and where.startswith(os.path.join(ROOT, 'meshd') + os.sep):
            with open(script, errors='replace') as handle:
                text = handle.read(4096)
            if 'meshd.entry' in text:
                return [script], script, notes
            notes.append('%s calls meshd.cli, not meshd.entry (installed before setup.py named '
                         'meshd.entry; `pip install -e .` again): ran `%s -m meshd` instead'
                         % (script, sys.executable))
            return ([sys.executable, '-m', 'meshd'], '%s -m meshd' % sys.executable, notes)
        notes.append('%s runs %s, not this checkout: using meshd.py' % (script, where or '?'))
    entry = os.path.join(ROOT, 'meshd.py')
    return [sys.executable, entry], '%s %s' % (sys.executable, entry), notes


def child_env(home):
    env = dict(os.environ, MESHD_HOME=home)
    for name in ('MESHD_SESSION_TOKEN_FILE', 'MESHD_TEST_TIMINGS', 'MESHD_DEBUG',
                 'MESHD_NO_AUTOSPAWN'):
        env.pop(name, None)
    return env


def rss_mib(pid):
    try:
        return psutil.Process(pid).memory_info().rss / MIB
    except psutil.Error:
        raise BenchError('process %d is gone' % pid)


class Daemon:
    """One member's home and its running daemon (if any)."""

    def __init__(self, name, home):
        self.name = name
        self.home = home
        self.socket = os.path.join(home, 'daemon', 'meshd.sock')
        self.db = os.path.join(home, 'daemon', 'meshd.db')
        self.pid = None
        self.durability = None

    def pubkey(self):
        with open(os.path.join(self.home, 'config.json')) as handle:
            return json.load(handle)['meshes'][0]['pubkey']

    def client(self, timeout=60.0):
        return LineClient(self.socket, timeout=timeout)

    def call(self, method, params=None):
        with self.client() as client:
            return client.call(method, params)

    def count(self, sql='SELECT count(*) FROM inbox'):
        """Rows counted in the daemon's database directly (calls would load the daemon)."""
        db = sqlite3.connect(self.db, timeout=30)
        try:
            return db.execute(sql).fetchone()[0]
        finally:
            db.close()

    def alive(self):
        return self.pid is not None and psutil.pid_exists(self.pid)


class Harness:
    """One broker and its members' daemons in directory `base`, run with the `cli` command."""

    def __init__(self, base, cli):
        self.base = base
        self.cli = cli
        self.broker = None
        self.broker_port = None
        self.broker_db = os.path.join(base, 'broker.db')
        self.started_at = time.time()
        self.daemons = {}
        self.other_pids = []   # daemons started in fresh homes (daemon up timing)

    # -- commands ---------------------------------------------------------------------

    def meshd(self, home, *args, timeout=120):
        """Run one meshd command to completion; its stdout. BenchError when it fails."""
        try:
            proc = subprocess.run(self.cli + list(args), env=child_env(home), cwd=self.base,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError('meshd %s did not finish within %d s' % (' '.join(args), timeout))
        if proc.returncode != 0:
            raise BenchError('meshd %s exited %d: %s' % (' '.join(args[:3]), proc.returncode,
                                                         (proc.stderr or proc.stdout)[-800:]))
        return proc.stdout

    # -- the broker and the mesh ------------------------------------------------------

    def start_broker(self):
        self.broker_port = free_port()
        log = open(os.path.join(self.base, 'broker.log'), 'ab')
        try:
            self.broker = subprocess.Popen(
                self.cli + ['broker', '--listen', '127.0.0.1:%d' % self.broker_port,
                            '--db', self.broker_db, '--rate-limit', 'off'],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.base,
                env=child_env(self.base))
        finally:
            log.close()
        try:
            wait_until(lambda: self._listening(self.broker_port), 60, 'the broker to listen',
                       alive=lambda: self.broker.poll() is None)
        except BenchError as exc:
            raise BenchError('%s; broker.log ends: %s' % (exc, self._log_tail('broker.log')))
        return self.broker.pid

    def _log_tail(self, name, size=600):
        try:
            with open(os.path.join(self.base, name), 'rb') as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - size))
                return handle.read().decode('utf-8', 'replace').strip() or '(empty)'
        except OSError:
            return '(no log)'

    def broker_count(self, sql):
        """A count read from the broker's SQLite database directly."""
        db = sqlite3.connect(self.broker_db, timeout=30)
        try:
            return db.execute(sql).fetchone()[0]
        finally:
            db.close()

    @property
    def broker_url(self):
        return 'ws://127.0.0.1:%d/ws' % self.broker_port

    def _listening(self, port):
        import socket
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            return True
        except OSError:
            return False

    def create_mesh(self, slug, names):
        """A mesh on the broker and a member daemon home per name, joined by invite."""
        self.meshd(self.base, 'broker-admin', 'create-mesh', '--name', slug, '--slug', slug,
                   '--db', self.broker_db)
        link = self.meshd(self.base, 'broker-admin', 'invite', '--mesh', slug, '--broker-url',
                          self.broker_url, '--max-uses', str(len(names)),
                          '--db', self.broker_db).strip().splitlines()[-1]
        for name in names:
            self.daemons[name] = Daemon(name, os.path.join(self.base, name))
        _in_parallel([lambda d=self.daemons[name]: self.meshd(d.home, 'join', link, '--name',
                                                              d.name)
                      for name in names], 'meshd join')
        return [self.daemons[name] for name in names]

    # -- daemons ------------------------------------------------------------------------

    def up(self, daemons, durability, slug):
        """`meshd daemon up` for each (in parallel), then wait for their broker links."""
        def one(daemon):
            out = self.meshd(daemon.home, 'daemon', 'up', '--no-tcp', '--json',
                             '--durability', durability)
            daemon.pid = json.loads(out)['pid']
            daemon.durability = durability
        _in_parallel([lambda d=d: one(d) for d in daemons], 'daemon up')
        for daemon in daemons:
            try:
                wait_until(lambda: ((try_call(daemon.socket, 'daemon.health') or {})
                                    .get('brokers', {}).get(slug, {}).get('status') == 'open'),
                           120, '%s link to the broker' % daemon.name, alive=daemon.alive)
            except BenchError as exc:
                raise BenchError('%s; daemon.log ends: %s' % (exc, self._log_tail(
                    os.path.join(daemon.name, 'daemon', 'daemon.log'))))

    def down(self, daemons, timeout=60):
        """SIGTERM each daemon (all at once, as `meshd daemon down` does) and wait for exit."""
        procs = []
        for daemon in daemons:
            proc = self._signal(daemon.pid, signal.SIGTERM)
            if proc is not None:
                procs.append(proc)
            daemon.pid = None
        gone, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            proc.kill()
        if alive:
            raise BenchError('%d daemon(s) did not stop within %d s' % (len(alive), timeout))

    def _signal(self, pid, signum):
        """The psutil.Process of `pid` after sending it `signum`, if it is a daemon this
        harness started (begun since, with its MESHD_HOME inside our directory), else None:
        a pid read from a stale pid file may name someone else's process by now."""
        if pid is None:
            return None
        try:
            proc = psutil.Process(pid)
            if proc.create_time() < self.started_at - 1:
                return None
            if not proc.environ().get('MESHD_HOME', '').startswith(self.base + os.sep):
                return None
            proc.send_signal(signum)
            return proc
        except psutil.Error:
            return None

    # -- cleanup ---------------------------------------------------------------------------

    def cleanup(self):
        pids = [d.pid for d in self.daemons.values()] + list(self.other_pids)
        for root, dirs, _files in os.walk(self.base):
            if 'meshd.pid' in _files:
                pids.append(_read_pid(os.path.join(root, 'meshd.pid')))
        procs = [p for p in (self._signal(pid, signal.SIGTERM) for pid in set(pids)) if p]
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
        _gone, alive = psutil.wait_procs(procs, timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        if self.broker is not None:
            try:
                self.broker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait()
        shutil.rmtree(self.base, ignore_errors=True)


def _in_parallel(calls, what):
    """Run each call in a thread of its own; BenchError with the first failure."""
    errors = []

    def run(call):
        try:
            call()
        except Exception as exc:  # reported below, in the caller's thread
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(call,), daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError('%s failed: %s' % (what, errors[0]))


def _read_pid(path):
    try:
        with open(path) as handle:
            return int(handle.read().strip().split()[0])
    except (OSError, ValueError, IndexError):
        return None
