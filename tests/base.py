"""Shared test helpers: short temp homes, real daemons and brokers, waiting with deadlines.

Tests wait on conditions with generous deadlines, never on fixed sleeps, and every process,
server or directory they create is registered for cleanup. One deadline, DEADLINE, scales
with MESHD_TEST_TIME_FACTOR for slow machines. Brokers run in the test process (nose2 runs
patched, so they serve while a test waits) through start_broker(); members are enrolled
with enrol(); daemons are `meshd daemon up --foreground` processes (DaemonProcess).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from rpc.client import RpcCallError, RpcClient, RpcConnectionError
from rpc.protocol import MAX_LINE

from meshd import clock, crypto

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, 'meshd.py')
TIME_FACTOR = float(os.environ.get('MESHD_TEST_TIME_FACTOR', '1'))
DEADLINE = 30.0 * TIME_FACTOR
# Timings that keep the suite fast; production values are in meshd.daemon.DEFAULT_TIMINGS.
TEST_TIMINGS = {'reaper_interval': 0.2, 'events_keepalive': 1.0, 'shutdown_grace': 2.0}


def short_tempdir():
    """A short directory under /tmp: Unix socket paths must stay under 108 bytes."""
    return tempfile.mkdtemp(prefix='meshd-', dir='/tmp')


def free_port():
    """A loopback port nobody listens on now, for a server that must keep its port across a
    restart (port 0 gives another one each time)."""
    probe = socket.socket()
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def wait_for(predicate, timeout=DEADLINE, interval=0.05, what='condition'):
    """Poll `predicate` until it returns a true value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('timed out after %.0fs waiting for %s' % (timeout, what))
        time.sleep(interval)


def make_mesh(slug, broker_url='ws://127.0.0.1:9/ws'):
    """A config.json mesh entry with a fresh member keypair."""
    public, secret = crypto.generate_keypair()
    return {'meshId': 'mesh-%s' % slug, 'memberId': 'member-%s' % slug, 'slug': slug,
            'name': slug, 'pubkey': public, 'secretKey': secret, 'brokerUrl': broker_url,
            'joinedAt': '2026-01-01T00:00:00.000Z'}


def presence_for(mesh):
    """A valid `presence` for sessions.register on a config.json mesh entry."""
    public, secret = crypto.generate_keypair()
    return crypto.session_presence(mesh['pubkey'], mesh['secretKey'], public, secret,
                                   clock.now_ms(), ttl_ms=3600 * 1000)


def meshd_env(home, timings=None, **extra):
    env = dict(os.environ)
    env.pop('MESHD_SESSION_TOKEN_FILE', None)
    env['MESHD_HOME'] = home
    env['MESHD_TEST_TIMINGS'] = json.dumps(dict(TEST_TIMINGS, **(timings or {})))
    env['PYTHONPATH'] = ROOT
    env.update(extra)
    return env


class DaemonProcess:
    """`meshd daemon up --foreground` as a child process, with its output in files."""

    def __init__(self, home, args=(), timings=None, env=None, preexec_fn=None):
        self.home = home
        self.args = list(args)
        self.env = meshd_env(home, timings, **(env or {}))
        self.preexec_fn = preexec_fn
        self.socket = os.path.join(home, 'daemon', 'meshd.sock')
        self.stdout_path = os.path.join(home, 'out.log')
        self.stderr_path = os.path.join(home, 'err.log')
        self.proc = None

    def start(self, wait=True):
        with open(self.stdout_path, 'ab') as out, open(self.stderr_path, 'ab') as err:
            self.proc = subprocess.Popen(
                [sys.executable, ENTRY, 'daemon', 'up', '--foreground'] + self.args,
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env, cwd=ROOT,
                preexec_fn=self.preexec_fn)
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self):
        return self.proc.pid

    def wait_ready(self, timeout=DEADLINE):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError('daemon exited with %s: %s' % (self.proc.returncode,
                                                                    self.stderr()))
            try:
                with RpcClient(socket_path=self.socket, timeout=2.0) as client:
                    return client.call('daemon.version')
            except (RpcConnectionError, RpcCallError, ValueError):
                return None
        return wait_for(ready, timeout, what='daemon socket to answer')

    def wait_exit(self, timeout=DEADLINE):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError('daemon did not exit within %.0fs' % timeout)

    def stop(self, signum=signal.SIGTERM, timeout=DEADLINE):
        """Signal the daemon and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.wait_exit(timeout)

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self, timeout=10.0):
        return RpcClient(socket_path=self.socket, timeout=timeout).connect()

    def call(self, method, params=None):
        with self.client() as client:
            return client.call(method, params)

    def stdout(self):
        with open(self.stdout_path, 'r', errors='replace') as handle:
            return handle.read()

    def stderr(self):
        with open(self.stderr_path, 'r', errors='replace') as handle:
            return handle.read()

    def log_lines(self):
        """Every JSON log line written so far, from both streams."""
        lines = []
        for text in (self.stdout(), self.stderr()):
            for line in text.splitlines():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
        return lines

    def wait_for_log(self, msg, timeout=DEADLINE):
        return wait_for(lambda: [line for line in self.log_lines() if line.get('msg') == msg],
                        timeout, what='log line %s' % msg)


class MeshdTestCase(unittest.TestCase):
    """A temporary MESHD_HOME per test, and helpers to run daemons and the CLI in it."""

    def setUp(self):
        self.home = short_tempdir()
        self.addCleanup(shutil.rmtree, self.home, True)

    def start_daemon(self, args=(), timings=None, env=None, home=None, wait=True,
                     preexec_fn=None):
        daemon = DaemonProcess(home or self.home, args, timings, env, preexec_fn)
        self.addCleanup(daemon.cleanup)
        return daemon.start(wait=wait)

    def run_cli(self, *args, env=None, home=None, timeout=DEADLINE, input=None):
        """Run `meshd.py ARGS`; returns the CompletedProcess (text)."""
        return subprocess.run([sys.executable, ENTRY] + list(args), capture_output=True,
                              text=True, env=meshd_env(home or self.home, **(env or {})),
                              cwd=ROOT, timeout=timeout, input=input)

    def write_config(self, meshes, home=None, **top_level):
        from meshd import config as config_mod
        config = {'version': 1, 'meshes': meshes}
        config.update(top_level)
        config_mod.save_config(os.path.join(home or self.home, 'config.json'), config)
        return config


# -- brokers and members -------------------------------------------------------------------

PG_ENV = 'MESHD_TEST_PG_URL'


def pg_url():
    """The PostgreSQL URL of the PostgreSQL variants, or a skip (a failure when CI is set)."""
    url = os.environ.get(PG_ENV)
    if not url:
        if os.environ.get('CI'):
            raise AssertionError('%s must be set in CI (every test runs in CI)' % PG_ENV)
        raise unittest.SkipTest('%s is not set' % PG_ENV)
    return url


def start_broker(test, db=None, port=0, timings=None, **kwargs):
    """A BrokerServer in this process on 127.0.0.1:`port` (0: a free one), on `db` (an
    SQLite file in a short temp dir when None; a PostgreSQL URL is emptied first), stopped
    and removed at the test's cleanup."""
    from meshd.broker import store as broker_store
    from meshd.broker.server import BrokerServer
    if db is None:
        tmp = short_tempdir()
        test.addCleanup(shutil.rmtree, tmp, True)
        db = os.path.join(tmp, 'broker.db')
    elif broker_store.sqlite_path(db) is None:
        store = broker_store.open_store(db, migrate_schema=False)
        try:
            broker_store.drop_all(store)
        finally:
            store.close()
    broker = BrokerServer(listen='127.0.0.1:%d' % port, db=db, timings=timings, **kwargs)
    broker.start()
    test.addCleanup(broker.stop)
    return broker


class Member:
    """A member key enrolled in a mesh of a broker (and, with session(), session keys)."""

    def __init__(self, mesh, member_id, name, pub, sec):
        self.mesh_id = mesh['id']
        self.slug = mesh['slug']
        self.member_id = member_id
        self.name = name
        self.pub, self.sec = pub, sec

    @classmethod
    def from_entry(cls, entry, name):
        """The member of a config.json mesh entry (what a daemon's hello is made from)."""
        return cls({'id': entry['meshId'], 'slug': entry['slug']}, entry['memberId'], name,
                   entry['pubkey'], entry['secretKey'])

    def session(self):
        """A fresh session keypair (pub, sec)."""
        return crypto.generate_keypair()

    def entry(self, broker_url):
        """This member as a config.json mesh entry of a daemon joined through `broker_url`."""
        return {'meshId': self.mesh_id, 'memberId': self.member_id, 'slug': self.slug,
                'name': self.slug, 'pubkey': self.pub, 'secretKey': self.sec,
                'brokerUrl': broker_url, 'joinedAt': '2026-01-01T00:00:00.000Z'}


def create_mesh(store, name, slug=None):
    """A mesh in the broker database of `store`; its admin.create_mesh answer."""
    from meshd.broker import admin
    with store.connection():
        return admin.create_mesh(store, name, slug=slug)


def enrol(store, mesh, name, role='member'):
    """Enroll a fresh member key in `mesh` (a create_mesh answer); return its Member."""
    from meshd.broker import admin
    pub, sec = crypto.generate_keypair()
    with store.connection():
        result = admin.add_member(store, mesh['slug'], pub, name, role=role)
    return Member(mesh, result['memberId'], name, pub, sec)


# -- raw RPC sockets -------------------------------------------------------------------------

def request(request_id, method, params=None):
    message = {'jsonrpc': '2.0', 'id': request_id, 'method': method}
    if params is not None:
        message['params'] = params
    return message


def notification(method, params=None):
    message = {'jsonrpc': '2.0', 'method': method}
    if params is not None:
        message['params'] = params
    return message


def line(obj):
    return json.dumps(obj, separators=(',', ':')).encode('utf-8') + b'\n'


class Raw:
    """A raw client socket: write bytes, read lines, see exactly what the daemon sent."""

    def __init__(self, sock, timeout=10.0):
        sock.settimeout(timeout)
        self.sock = sock
        self.rfile = sock.makefile('rb')

    @classmethod
    def unix(cls, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10.0)
        sock.connect(path)
        return cls(sock)

    @classmethod
    def tcp(cls, address):
        host, _, port = address.rpartition(':')
        return cls(socket.create_connection((host, int(port)), timeout=10.0))

    def close(self):
        for closable in (self.rfile, self.sock):
            try:
                closable.close()
            except OSError:
                pass

    def send(self, data):
        self.sock.sendall(data)

    def send_json(self, obj):
        self.send(line(obj))

    def read_line(self):
        try:
            return self.rfile.readline(4 * MAX_LINE)
        except socket.timeout:
            raise AssertionError('no line from the daemon within the timeout')

    def read_json(self):
        data = self.read_line()
        if not data:
            raise AssertionError('the daemon closed the connection instead of answering')
        if not data.endswith(b'\n'):
            raise AssertionError('answer not ended by a newline: %r' % data[:200])
        return json.loads(data)

    def read_to_end(self, reset_ok=False):
        """Every byte the daemon sends until it closes the connection in order (b'' on read).

        With `reset_ok`, a reset also counts as closed: for a peer the daemon refuses before
        reading anything, the request left unread makes the kernel reset the connection.
        """
        received = b''
        try:
            while True:
                chunk = self.rfile.readline(4 * MAX_LINE)
                if not chunk:
                    return received
                received += chunk
        except socket.timeout:
            raise AssertionError('the daemon did not close the connection; got %r'
                                 % received[:200])
        except ConnectionResetError:
            if reset_ok:
                return received
            raise AssertionError('the connection was reset instead of closed (EOF) after %r'
                                 % received[:200])
