"""`meshd quickstart`: a local broker, two identities and a DM going through, in one command.

Everything lives under $MESHD_HOME/quickstart/ (a sandbox that is recreated on each run):
a `meshd broker` on SQLite on a free loopback port, a mesh with `alice` and `bob` joined
through real invites, one daemon for each, a DM from alice to bob shown as it arrives, and
socat one-liners to go on by hand. Ctrl-C stops everything it started.
"""
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time

from rpc.client import RpcCallError, RpcClient, RpcConnectionError

from meshd import config as config_mod, files
from meshd.exceptions import CommandFailed, QuickstartError
from meshd.paths import Paths

READY_TIMEOUT = 30.0
NAMES = ('alice', 'bob')


def _free_port():
    probe = socket.socket()
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


class Quickstart:
    """The processes and homes of one quickstart run."""

    def __init__(self, entry, base, out=print):
        self.entry = list(entry)   # how to run this meshd again (checkout, zipapp or package)
        self.base = base
        self.out = out
        self.broker = None
        self.homes = {name: os.path.join(base, name) for name in NAMES}
        self.broker_db = os.path.join(base, 'broker', 'broker.db')

    def _meshd(self, *args, home=None, check=True):
        env = dict(os.environ)
        env.pop('MESHD_SESSION_TOKEN_FILE', None)
        if home is not None:
            env['MESHD_HOME'] = home
        result = subprocess.run(self.entry + list(args), capture_output=True, text=True, env=env,
                                timeout=60)
        if check and result.returncode != 0:
            raise QuickstartError('`meshd %s` failed: %s' % (' '.join(args[:2]),
                                                             result.stderr.strip()[-300:]))
        return result.stdout

    def run(self):
        self.stop_previous()
        shutil.rmtree(self.base, ignore_errors=True)
        files.ensure_private_dir(os.path.dirname(self.broker_db))
        port = _free_port()
        url = 'ws://127.0.0.1:%d/ws' % port
        self.out('1. starting a local broker on %s (SQLite: %s)' % (url, self.broker_db))
        log = open(os.path.join(self.base, 'broker', 'broker.log'), 'ab')
        self.broker = subprocess.Popen(
            self.entry + ['broker', '--listen', '127.0.0.1:%d' % port, '--db', self.broker_db],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self._wait_broker(port)
        self.out('2. creating mesh "quickstart" and joining alice and bob with invites')
        self._meshd('broker-admin', 'create-mesh', '--name', 'quickstart', '--db', self.broker_db)
        link = self._meshd('broker-admin', 'invite', '--mesh', 'quickstart', '--broker-url', url,
                           '--max-uses', str(len(NAMES)), '--db',
                           self.broker_db).strip().splitlines()[-1]
        for name in NAMES:
            self._meshd('join', link, '--name', name, home=self.homes[name])
        self.out('3. starting a daemon for each (homes under %s)' % self.base)
        for name in NAMES:
            self._meshd('daemon', 'up', '--no-tcp', home=self.homes[name])
        for name in NAMES:
            self._wait_open(name)
        bob_key = self._member_key('bob')
        self.out('4. alice sends bob a direct message (end-to-end encrypted)')
        answer = self._call('alice', 'send', {'to': bob_key, 'message': 'hello bob, from alice'})
        self.out('   queued: client_message_id=%s' % answer['client_message_id'])
        item = self._wait_inbox('bob')
        self.out('5. bob received it: "%s" from %s (decrypted with bob\'s key)'
                 % (item['body'], item['sender_pubkey'][:16]))
        self._print_next_steps(bob_key)

    def _print_next_steps(self, bob_key):
        alice_sock = Paths(self.homes['alice']).socket
        bob_sock = Paths(self.homes['bob']).socket
        self.out('')
        self.out('Send as alice:')
        self.out("  echo '%s' | socat - UNIX-CONNECT:%s" % (json.dumps(
            {'jsonrpc': '2.0', 'id': 1, 'method': 'send',
             'params': {'to': bob_key, 'message': 'hi again'}}, separators=(',', ':')),
            alice_sock))
        self.out("Watch bob's events:")
        self.out("  echo '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"events.subscribe\"}' | "
                 'socat -t 86400 - UNIX-CONNECT:%s' % bob_sock)
        self.out("Read bob's inbox:")
        self.out("  echo '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"inbox.list\"}' | "
                 'socat - UNIX-CONNECT:%s' % bob_sock)
        self.out('')
        self.out('Running. Press Ctrl-C to stop the broker and both daemons.')

    def _wait_broker(self, port):
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.broker.poll() is not None:
                raise QuickstartError('the broker exited with status %d (log: %s)' % (
                    self.broker.returncode, os.path.join(self.base, 'broker', 'broker.log')))
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise QuickstartError('the broker did not start within %ds' % READY_TIMEOUT)

    def _call(self, name, method, params=None):
        with RpcClient(socket_path=Paths(self.homes[name]).socket, timeout=10.0) as client:
            return client.call(method, params)

    def _member_key(self, name):
        config = config_mod.load_config(Paths(self.homes[name]).config)
        return config['meshes'][0]['pubkey']

    def _wait_open(self, name):
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            brokers = self._call(name, 'daemon.health')['brokers']
            if brokers and all(b['status'] == 'open' for b in brokers.values()):
                return
            time.sleep(0.1)
        raise QuickstartError('%s could not connect to the broker' % name)

    def _wait_inbox(self, name):
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            items = self._call(name, 'inbox.list')['items']
            if items:
                return items[0]
            time.sleep(0.1)
        raise QuickstartError('the message did not reach %s within %ds' % (name, READY_TIMEOUT))

    def stop_previous(self):
        """Stop daemons a previous quickstart left running (its sandbox is about to go)."""
        for home in self.homes.values():
            if os.path.exists(os.path.join(home, 'daemon', 'meshd.pid')):
                self._meshd('daemon', 'down', home=home, check=False)

    def stop(self):
        for home in self.homes.values():
            if os.path.exists(os.path.join(home, 'daemon', 'meshd.pid')):
                self._meshd('daemon', 'down', home=home, check=False)
        if self.broker is not None and self.broker.poll() is None:
            self.broker.send_signal(signal.SIGTERM)
            try:
                self.broker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait()


def main(entry, home, wait=True, out=print):
    """Run the quickstart; block until SIGINT/SIGTERM when `wait`. A failed step raises
    CommandFailed once everything started is stopped again."""
    lock = _hold_lock(home)     # a second run would wipe the first one's sandbox under it
    quickstart = Quickstart(entry, os.path.join(home, 'quickstart'), out)
    stop = {'signal': None}

    def handle(signum, _frame):
        stop['signal'] = signum
    try:
        quickstart.run()
        if wait:
            previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                while stop['signal'] is None and quickstart.broker.poll() is None:
                    time.sleep(0.2)
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
    except (QuickstartError, RpcConnectionError, RpcCallError, subprocess.TimeoutExpired) as exc:
        raise CommandFailed('✘ quickstart: %s' % exc) from exc
    finally:
        out('stopping…')
        quickstart.stop()
        os.close(lock)


def _hold_lock(home):
    """An flock on <home>/quickstart.lock for this run; CommandFailed when another run holds
    it (the lock ends with the process, so a killed run never blocks the next)."""
    files.ensure_private_dir(home)
    path = os.path.join(home, 'quickstart.lock')
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = (os.read(fd, 32).decode('ascii', 'replace').strip() or '?')
        os.close(fd)
        raise CommandFailed('✘ quickstart: another quickstart runs on %s (pid %s); stop it '
                            '(Ctrl-C) first' % (home, holder))
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode('ascii'))
    return fd
