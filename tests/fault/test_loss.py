"""Loss and duplication under faults: 2,000 DMs through kills, a broker restart and a cut.

The issue asks for "a loss/duplication run of at least 2,000 DMs through SIGKILLs of both
daemons, a broker restart and a network cut through a small TCP proxy in the test, asserting
every client_message_id exactly once (and reporting order inversions)".

Everything is a real process except the proxy: the broker (`meshd.py broker`, so that it can
be SIGKILLed and started again on the same port and database) and two daemons, alice (the
sender) and bob (the receiver). Alice reaches the broker directly; bob reaches it through
tests.fault.proxy.TcpProxy, so the network cut is bob's alone: alice keeps draining into the
broker while bob is cut off, and the broker has to hand bob the backlog when the path comes
back. (A cut of alice's path would look to her like the broker restart, which the run has.)
"""
import collections
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import gevent
import gevent.event

from rpc.client import RpcCallError, RpcClient, RpcConnectionError
from rpc.protocol import encode, request

from meshd.broker import store as broker_store
from tests.base import (DEADLINE, ENTRY, ROOT, TIME_FACTOR, MeshdTestCase, create_mesh, enrol,
                        free_port, meshd_env, short_tempdir, wait_for)
from tests.fault.proxy import TcpProxy
from tests.links_base import DAEMON_TIMINGS

# MESHD_FAULT_DMS raises the count for a longer local run; the floor is 2,000.
DMS = max(2000, int(os.environ.get('MESHD_FAULT_DMS', '2000')))
# Long enough for a loaded 2-core CI machine to deliver the backlog a cut leaves behind.
DELIVERY_DEADLINE = 120.0 * TIME_FACTOR
# Faults are injected once the sender has had this share of the DMs accepted, in this order.
FAULT_AT = (0.125, 0.35, 0.575, 0.8)
# The sender may run this far past the next fault's threshold before that fault is injected,
# so that every fault lands inside the stream even when a restart is slow.
GATE_MARGIN = 200
CHUNK = 20          # send calls pipelined on alice's socket at a time
CHUNK_PAUSE = 0.1   # between chunks: at most 200 DMs a second, a stream that outlasts the faults
# Fault conditions: rows caught unacked by a kill, and the backlogs built while a peer is away.
UNACKED = 5
BOB_DOWN_BACKLOG = 100
BROKER_DOWN_ACCEPTS = 100
CUT_BACKLOG = 250   # about two seconds of the stream: a cut of a few seconds
POLL = 0.005        # polling for a fault's trigger (a drain or a delivery caught mid-way)
# MESHD_FAULT_KEEP=1 keeps the temporary directories (logs, databases) of a run.
KEEP = os.environ.get('MESHD_FAULT_KEEP') == '1'

DAEMON_FAULT_TIMINGS = dict(DAEMON_TIMINGS, link_ack_timeout=5.0, link_ping_interval=1.0,
                            link_stale_after=6.0)
BROKER_FAULT_TIMINGS = {'broker_ping': 1.0, 'broker_pong_timeout': 10.0, 'broker_grace': 5.0,
                        'broker_lease': 3.0, 'broker_sweep': 0.5, 'broker_ttl_sweep': 600.0}

CMID = 'fault-%05d'
BODY = 'fault dm %05d'
_CMID_INDEX = re.compile(r'^fault-(\d{5})$')



def query(path, sql, params=()):
    """Rows of `sql` on an SQLite file, read-only; the owning process keeps writing (WAL)."""
    db = sqlite3.connect('file:%s?mode=ro' % path, uri=True, timeout=10)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def count_inversions(indexes):
    """Messages that arrived after one with a higher index (the order they were sent in)."""
    inversions, highest = 0, -1
    for index in indexes:
        if index < highest:
            inversions += 1
        highest = max(highest, index)
    return inversions


class BrokerProcess:
    """`meshd.py broker` as a child process on a fixed port and database, output in a file."""

    def __init__(self, directory, port, timings):
        self.directory = directory
        self.port = port
        self.db = os.path.join(directory, 'broker.db')
        self.log_path = os.path.join(directory, 'broker.log')
        self.env = meshd_env(directory, timings)
        self.proc = None
        self.starts = 0

    @property
    def url(self):
        return 'ws://127.0.0.1:%d/ws' % self.port

    def start(self):
        with open(self.log_path, 'ab') as out:
            self.proc = subprocess.Popen(
                [sys.executable, ENTRY, 'broker', '--listen', '127.0.0.1:%d' % self.port,
                 '--db', self.db, '--rate-limit', 'off'],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                cwd=ROOT)
        self.starts += 1
        wait_for(self._listening, what='broker listening on port %d' % self.port)
        return self

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError('broker exited with %s:\n%s' % (self.proc.returncode,
                                                                 self.log_tail()))
        try:
            socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE)

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines=20):
        with open(self.log_path, 'r', errors='replace') as handle:
            return ''.join(handle.readlines()[-lines:])


class Sender:
    """Streams DMs to bob through alice's `send`, CHUNK calls pipelined at a time.

    Index n is always sent as client_message_id CMID % n with the same body, so a retry is
    the same request. A call that got no answer because alice's daemon went away is sent
    again, with the same id, once the daemon answers again; a call answered with a result
    is never sent again. An error answer stops the sender (the test then fails with it).
    `gate` is how far it may go for now.
    """

    def __init__(self, socket_path, to, count):
        self.socket_path = socket_path
        self.to = to
        self.count = count
        self.gate = count
        self.accepted = {}            # index -> result of its send
        self.written = set()          # indexes written to alice's socket at least once
        self.retry = []               # indexes to send again, oldest first
        self.next_index = 0
        self.resent = 0               # calls written again after a connection loss
        self.duplicate_answers = 0    # retries the daemon had already committed
        self.connection_losses = 0    # answers cut short by alice going away
        self.connect_failures = 0     # connection attempts while alice was down
        self.error = None
        self.finished = gevent.event.Event()
        self.greenlet = None

    def start(self):
        self.greenlet = gevent.spawn(self._run)
        return self

    def stop(self):
        if self.greenlet is not None:
            self.greenlet.kill(block=True)

    @property
    def failure(self):
        if self.error is not None:
            return self.error
        if self.greenlet is not None and self.greenlet.dead and not self.greenlet.successful():
            return 'sender crashed: %r' % (self.greenlet.exception,)
        return None

    def params(self, index):
        return {'to': self.to, 'message': BODY % index, 'client_message_id': CMID % index}

    def _next_chunk(self):
        chunk = self.retry[:CHUNK]
        del self.retry[:CHUNK]
        while len(chunk) < CHUNK and self.next_index < min(self.gate, self.count):
            chunk.append(self.next_index)
            self.next_index += 1
        return chunk

    def _run(self):
        client = None
        try:
            while len(self.accepted) < self.count:
                chunk = self._next_chunk()
                if not chunk:
                    gevent.sleep(0.02)    # at the gate: the next fault is not injected yet
                    continue
                try:
                    if client is None:
                        client = RpcClient(socket_path=self.socket_path, timeout=60).connect()
                    self.resent += len([n for n in chunk if n in self.written])
                    self.written.update(chunk)
                    client.send_raw(b''.join(encode(request(n, 'send', self.params(n)))
                                             for n in chunk))
                    for _ in chunk:
                        self._answer(client.read_message())
                except RpcConnectionError:
                    # alice is down (or going down): whatever got no answer goes again, as is.
                    if client is None:
                        self.connect_failures += 1
                    else:
                        self.connection_losses += 1
                    self.retry[:0] = [n for n in chunk if n not in self.accepted]
                    if client is not None:
                        client.close()
                        client = None
                    gevent.sleep(0.05)
                    continue
                if self.error is not None:
                    return
                gevent.sleep(CHUNK_PAUSE)
        finally:
            if client is not None:
                client.close()
            self.finished.set()

    def _answer(self, answer):
        index = answer.get('id')
        if 'error' in answer:
            if self.error is None:
                self.error = 'send %s answered %s' % (index, json.dumps(answer['error']))
            return
        result = answer['result']
        if index in self.accepted:
            self.error = 'send %s answered twice' % index
            return
        if result.get('client_message_id') != CMID % index:
            self.error = 'send %s answered for %s' % (index, result.get('client_message_id'))
            return
        if result.get('duplicate'):
            self.duplicate_answers += 1
        self.accepted[index] = result


class LossUnderFaultsTest(MeshdTestCase):
    """2,000 DMs alice → bob, each exactly once, through four faults injected mid-stream."""

    def setUp(self):
        super().setUp()
        self.base = self.home if not KEEP else short_tempdir()
        if KEEP:
            sys.stderr.write('\nfault run kept in %s\n' % self.base)
        self.started = time.monotonic()
        self.marks = []
        # The broker's mesh and members are written before the broker process starts.
        broker_dir = os.path.join(self.base, 'broker')
        os.mkdir(broker_dir, 0o700)
        self.broker = BrokerProcess(broker_dir, free_port(), BROKER_FAULT_TIMINGS)
        self.addCleanup(self.broker.cleanup)
        store = broker_store.open_store(self.broker.db)
        try:
            mesh = create_mesh(store, 'Fault', slug='fault')
            self.alice = enrol(store, mesh, 'alice').entry(self.broker.url)
            self.bob = enrol(store, mesh, 'bob').entry(None)
        finally:
            store.close()
        self.broker.start()
        self.proxy = TcpProxy('127.0.0.1', self.broker.port).start()
        self.addCleanup(self.proxy.close)
        self.bob['brokerUrl'] = self.proxy.url
        self.homes = {}
        for name, entry in (('alice', self.alice), ('bob', self.bob)):
            home = os.path.join(self.base, name)
            os.mkdir(home, 0o700)
            self.write_config([entry], home=home)
            self.homes[name] = home
        self.da = self._start('alice')
        self.db = self._start('bob')
        self._wait_link(self.da, 'open')
        self._wait_link(self.db, 'open')
        self.sender = Sender(self.da.socket, self.bob['pubkey'], DMS)
        self.addCleanup(self.sender.stop)

    def _start(self, name):
        return self.start_daemon(args=['--no-tcp'], timings=DAEMON_FAULT_TIMINGS,
                                 home=self.homes[name])

    # -- observations --------------------------------------------------------------------

    def _db_path(self, name):
        return os.path.join(self.homes[name], 'daemon', 'meshd.db')

    def _alice_count(self, statuses):
        return query(self._db_path('alice'),
                     'SELECT count(*) FROM outbox WHERE status IN (%s)'
                     % ', '.join('?' * len(statuses)), statuses)[0][0]

    def _bob_received(self):
        return query(self._db_path('bob'), 'SELECT count(*) FROM inbox')[0][0]

    def _broker_claimed(self):
        """DMs the broker pushed to bob and holds claimed: bob has not acked them yet."""
        return query(self.broker.db, 'SELECT count(*) FROM message_queue WHERE '
                                     'delivered_at IS NULL AND claim_id IS NOT NULL')[0][0]

    def _broker_undelivered(self):
        return query(self.broker.db, 'SELECT count(*) FROM message_queue '
                                     'WHERE delivered_at IS NULL')[0][0]

    def _assert_none(self, items, what):
        if items:
            self.fail('%d %s, e.g. %s\n%s' % (len(items), what, items[:10],
                                              self._diagnostics()))

    def _link_status(self, daemon):
        try:
            return daemon.call('daemon.health')['brokers'].get('fault', {}).get('status')
        except (RpcConnectionError, RpcCallError):
            return None

    def _wait_link(self, daemon, status):
        self._wait(lambda: self._link_status(daemon) == status,
                   'the link of %s to be %s' % (os.path.basename(daemon.home), status))

    def _wait(self, predicate, what, timeout=DEADLINE, interval=0.05):
        """wait_for, failing at once if the sender stopped on an error."""
        def check():
            failure = self.sender.failure if hasattr(self, 'sender') else None
            if failure:
                raise AssertionError(failure)
            return predicate()
        try:
            return wait_for(check, timeout, interval, what)
        except AssertionError as exc:
            raise AssertionError('%s\n%s' % (exc, self._diagnostics())) from None

    def _wait_accepted(self, count):
        self._wait(lambda: len(self.sender.accepted) >= count,
                   '%d sends accepted by alice' % count)

    def _mark(self, what):
        self.marks.append('%6.1fs %s' % (time.monotonic() - self.started, what))

    def _diagnostics(self):
        lines = ['-- fault run state --'] + self.marks
        try:
            lines.append('sender: %d accepted, next %d, gate %d, %d to retry, error %s' % (
                len(self.sender.accepted), self.sender.next_index, self.sender.gate,
                len(self.sender.retry), self.sender.failure))
        except AttributeError:
            pass
        for what, fn in (('alice outbox', lambda: query(
                              self._db_path('alice'),
                              'SELECT status, count(*) FROM outbox GROUP BY status')),
                         ('bob inbox rows', self._bob_received),
                         ('broker queue', lambda: query(
                              self.broker.db, 'SELECT delivered_at IS NOT NULL, '
                              'claim_id IS NOT NULL, count(*) FROM message_queue GROUP BY 1, 2')),
                         ('alice link', lambda: self._link_status(self.da)),
                         ('bob link', lambda: self._link_status(self.db)),
                         ('proxy', lambda: self.proxy.counts)):
            try:
                lines.append('%s: %s' % (what, fn()))
            except Exception as exc:
                lines.append('%s: unreadable (%s)' % (what, exc))
        for name in ('alice', 'bob'):
            path = os.path.join(self.homes.get(name, ''), 'err.log')
            if os.path.exists(path):
                with open(path, errors='replace') as handle:
                    tail = handle.readlines()[-8:]
                lines.append('%s err.log tail:\n%s' % (name, ''.join(tail)))
        try:
            lines.append('broker log tail:\n%s' % self.broker.log_tail(8))
        except OSError:
            pass
        return '\n'.join(lines)

    # -- the run -------------------------------------------------------------------------

    def test_every_dm_exactly_once_through_kills_a_broker_restart_and_a_cut(self):
        """Every DM exactly once through two daemon SIGKILLs, a broker SIGKILL and a cut.

        A steady stream of DMs goes from alice to bob while, in turn:

        1. alice's daemon is SIGKILLed with rows of its outbox not yet acked by the broker
           (caught mid-drain) and restarted on the same home; the sender sends every call
           that got no answer again with the same client_message_id;
        2. bob's daemon is SIGKILLed while the broker holds DMs pushed to it and not acked
           (caught mid-delivery), stays down while alice drains more DMs into the broker for
           it, and is restarted;
        3. the broker is SIGKILLed and, once alice's link noticed and alice accepted more
           DMs meanwhile, restarted on the same port and database;
        4. bob's path through the proxy is cut (connections reset, new ones held) until the
           broker holds a backlog for bob, then restored.
        Then every client_message_id must be in bob's inbox exactly once with its body,
        every row of alice's outbox done, and one broker queue row per id, delivered.
        The order inversions in bob's inbox (arrival order) are reported, not asserted.
        """
        thresholds = [int(DMS * share) for share in FAULT_AT]
        self.sender.gate = thresholds[1] + GATE_MARGIN
        self.sender.start()
        self._mark('stream started')
        report = {}

        # 1. alice, mid-drain: rows accepted but not yet acked by the broker.
        self._wait_accepted(thresholds[0])
        report['alice_unacked_at_kill'] = self._wait(
            lambda: (lambda n: n if n >= UNACKED else 0)(self._alice_count(('pending',
                                                                            'inflight'))),
            'alice to have %d rows in her drain' % UNACKED, interval=POLL)
        self.da.stop(signal.SIGKILL)
        self._mark('alice SIGKILLed with %d rows unacked' % report['alice_unacked_at_kill'])
        self.da = self._start('alice')
        self._mark('alice restarted')
        self.sender.gate = thresholds[2] + GATE_MARGIN

        # 2. bob, mid-delivery: the broker has pushed DMs bob has not acked.
        self._wait_accepted(thresholds[1])
        report['bob_unacked_at_kill'] = self._wait(
            lambda: (lambda n: n if n >= UNACKED else 0)(self._broker_claimed()),
            '%d DMs pushed to bob and not acked' % UNACKED, interval=POLL)
        self.db.stop(signal.SIGKILL)
        self._mark('bob SIGKILLed with %d pushes unacked' % report['bob_unacked_at_kill'])
        done = self._alice_count(('done',))
        self._wait(lambda: self._alice_count(('done',)) >= done + BOB_DOWN_BACKLOG,
                   'alice to drain %d DMs for bob while bob is down' % BOB_DOWN_BACKLOG)
        self.db = self._start('bob')
        self._mark('bob restarted')
        self.sender.gate = thresholds[3] + GATE_MARGIN

        # 3. the broker: SIGKILL, alice accepts more meanwhile, restart on the same port.
        self._wait_accepted(thresholds[2])
        self.broker.kill()
        self._mark('broker SIGKILLed')
        self._wait(lambda: self._link_status(self.da) not in ('open', None),
                   "alice's link to notice the broker is gone")
        accepted = len(self.sender.accepted)
        self._wait_accepted(accepted + BROKER_DOWN_ACCEPTS)
        self.broker.start()
        self._mark('broker restarted')
        self.sender.gate = DMS   # the cut waits for a backlog: nothing may hold the stream

        # 4. a network cut of bob's path, until the broker holds a backlog for bob.
        self._wait_accepted(thresholds[3])
        self.proxy.cut(new='hold')
        self._mark('bob cut off')
        self._wait(lambda: self._link_status(self.db) not in ('open', None),
                   "bob's link to notice the cut")
        done = self._alice_count(('done',))
        self._wait(lambda: (self._alice_count(('done',)) >= done + CUT_BACKLOG
                            and self.proxy.held),
                   'a backlog of %d DMs for bob and a reconnect held by the cut' % CUT_BACKLOG)
        self.proxy.restore()
        self._mark('bob path restored')

        # Every DM accepted, then quiet: alice's outbox all done (the broker committed each
        # row before acking it) and nothing undelivered at the broker (bob acks a push only
        # after committing it). Past that point bob's inbox can only be checked, not awaited.
        self._wait(self.sender.finished.is_set, 'the sender to finish', DELIVERY_DEADLINE)
        self.assertIsNone(self.sender.failure)
        self._mark('stream finished')
        self._wait(lambda: (self._alice_count(('done',)) >= DMS
                            and self._broker_undelivered() == 0),
                   "alice's outbox all done and every DM delivered by the broker",
                   DELIVERY_DEADLINE, interval=0.2)
        self._mark('every DM acknowledged end to end')

        expected = {CMID % n for n in range(DMS)}
        self.assertEqual(sorted(self.sender.accepted), list(range(DMS)))

        inbox = query(self._db_path('bob'),
                      'SELECT client_message_id, body, sender_pubkey, decrypt_failed '
                      'FROM inbox ORDER BY rowid')
        seen = collections.Counter(row[0] for row in inbox)
        self._assert_none(sorted(expected - set(seen)), 'ids missing from bob\'s inbox')
        self._assert_none(sorted(set(seen) - expected), 'unexpected ids in bob\'s inbox')
        self._assert_none(sorted(cmid for cmid, n in seen.items() if n != 1),
                          'ids stored more than once in bob\'s inbox')
        self._assert_none([row for row in inbox if (row[1], row[2], row[3]) != (
            BODY % int(row[0][6:]), self.alice['pubkey'], 0)],
            'inbox rows with a wrong body, sender or decryption')

        outbox = query(self._db_path('alice'),
                       'SELECT client_message_id, status, attempts FROM outbox')
        self.assertEqual({row[0] for row in outbox}, expected, "alice's outbox ids")
        self.assertEqual(len(outbox), DMS)
        self._assert_none([row for row in outbox if row[1] != 'done'],
                          "alice's outbox rows not done")

        queue = query(self.broker.db, 'SELECT client_message_id, count(*) FROM message_queue '
                                      'GROUP BY client_message_id')
        self._assert_none(sorted(cmid for cmid, n in queue if n != 1),
                          'ids queued more than once by the broker')
        self.assertEqual({cmid for cmid, _n in queue}, expected, 'broker queue ids')

        arrival = [int(_CMID_INDEX.match(row[0]).group(1)) for row in inbox]
        report.update(
            dms=DMS, order_inversions=count_inversions(arrival),
            sends_written_again=self.sender.resent,
            duplicate_send_answers=self.sender.duplicate_answers,
            sender_connection_losses=self.sender.connection_losses,
            sender_connect_failures=self.sender.connect_failures,
            outbox_rows_sent_more_than_once=sum(1 for row in outbox if row[2] > 1),
            broker_starts=self.broker.starts, proxy=self.proxy.counts,
            seconds=round(time.monotonic() - self.started, 1))
        sys.stderr.write('\nfault run: %s\n%s\n' % (json.dumps(report, sort_keys=True),
                                                    '\n'.join(self.marks)))
