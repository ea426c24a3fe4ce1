"""Shared test helpers: short temp homes, real daemon processes, waiting with deadlines.

Tests wait on conditions with generous deadlines, never on fixed sleeps, and every process
or directory they create is registered for cleanup. Deadlines scale with
MESHD_TEST_TIME_FACTOR for slow machines.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from rpc.client import RpcCallError, RpcClient, RpcConnectionError

from meshd import crypto

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, 'meshd.py')
TIME_FACTOR = float(os.environ.get('MESHD_TEST_TIME_FACTOR', '1'))
DEADLINE = 30.0 * TIME_FACTOR
# Timings that keep the suite fast; production values are in meshd.daemon.DEFAULT_TIMINGS.
TEST_TIMINGS = {'reaper_interval': 0.2, 'events_keepalive': 1.0, 'shutdown_grace': 2.0}


def short_tempdir():
    """A short directory under /tmp: Unix socket paths must stay under 108 bytes."""
    return tempfile.mkdtemp(prefix='meshd-', dir='/tmp')


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
