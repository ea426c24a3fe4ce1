"""Shared data when the broker misbehaves (docs/local-api.md, "Shared data, presence,
moderation, grants and message status"; meshd/broker_calls.py; spec/wire.md §4.3–4.5).

1. A broker that stops answering (a real `meshd broker` process, SIGSTOPped while the
   daemon's link stays open): every verb with a reply answers `broker_timeout`
   (retryable) within its timeout, and message.status answers delivery `unknown` with a
   `detail` instead of an error; after SIGCONT the broker answers again.
2. No open link (the mesh's broker port has no listener): every verb, with a reply or
   without, answers `broker_unreachable` at once.
3. A broker that answers in the shapes claudemesh's own daemon waits for (spec/wire.md §4.4
   QUIRK) and announces no meshd extension: the daemon reads the same results from it as
   from meshd's broker; grants answer `unsupported_by_broker` and message.status `unknown`.
"""
import collections
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import unittest
from unittest import mock

import gevent

from rpc.client import RpcCallError, RpcClient

from meshd import crypto
from meshd.broker import store as broker_store
from meshd.broker.wsock import BrokerWebSocket
from tests.base import (ROOT, MeshdTestCase, create_mesh, enrol, free_port,
                        make_mesh, meshd_env, short_tempdir, start_broker, wait_for)
from tests.links_base import BROKER_TIMINGS, DAEMON_TIMINGS, LinksTestCase

RPC_TIMEOUT = 2.0           # the daemon's link_rpc_timeout in the SIGSTOP test
MARGIN = 10.0               # generous: an answer must come within its timeout plus this
CALL_TIMEOUT = 60.0         # the test's own socket timeout for one call


def call(daemon, method, params=None, timeout=CALL_TIMEOUT):
    """(result, None) or (None, RpcCallError) of one call on its own connection."""
    with RpcClient(socket_path=daemon.socket, timeout=timeout) as client:
        try:
            return client.call(method, params), None
        except RpcCallError as exc:
            return None, exc


def timed(daemon, method, params):
    """(result, error, seconds) of one call on its own connection."""
    started = time.monotonic()
    result, error = call(daemon, method, params)
    return result, error, time.monotonic() - started


# -- 1. a stopped broker ---------------------------------------------------------------------

class BrokerProcess:
    """`python -m meshd broker` as a child process on a fixed port, output in a file."""

    def __init__(self, directory, port):
        self.port = port
        self.db = os.path.join(directory, 'broker.db')
        self.log_path = os.path.join(directory, 'broker.log')
        self.env = meshd_env(directory, BROKER_TIMINGS)
        self.proc = None

    @property
    def url(self):
        return 'ws://127.0.0.1:%d/ws' % self.port

    def start(self):
        with open(self.log_path, 'ab') as out:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'meshd', 'broker', '--listen',
                 '127.0.0.1:%d' % self.port, '--db', self.db, '--rate-limit', 'off'],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                cwd=ROOT)
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

    def process_state(self):
        """The kernel's one-letter state of the process (T: stopped)."""
        with open('/proc/%d/stat' % self.proc.pid) as handle:
            return handle.read().rpartition(')')[2].split()[0]

    def stop_signal(self):
        self.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: self.process_state() == 'T', what='the broker stopped')

    def cont(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines=20):
        with open(self.log_path, 'r', errors='replace') as handle:
            return ''.join(handle.readlines()[-lines:])


class StoppedBrokerTest(MeshdTestCase):
    """alice's daemon on a broker process that is SIGSTOPped: its link stays open (no ping,
    no staleness check within the test), so nothing fails fast and every reply times out."""

    def setUp(self):
        super().setUp()
        broker_dir = short_tempdir()
        self.addCleanup(shutil.rmtree, broker_dir, True)
        self.broker = BrokerProcess(broker_dir, free_port())
        self.addCleanup(self.broker.cleanup)
        # SIGCONT always, and before the kill above (cleanups run last in, first out).
        self.addCleanup(self.broker.cont)
        store = broker_store.open_store(self.broker.db)
        try:
            mesh = create_mesh(store, 'Team', slug='team')
            self.alice_entry = enrol(store, mesh, 'alice').entry(self.broker.url)
            self.bob_entry = enrol(store, mesh, 'bob').entry(self.broker.url)
        finally:
            store.close()
        self.broker.start()
        self.write_config([self.alice_entry])
        self.alice = self.start_daemon(timings=dict(
            DAEMON_TIMINGS, link_rpc_timeout=RPC_TIMEOUT, link_ping_interval=600.0,
            link_stale_after=600.0))
        wait_for(lambda: self.link_status() == 'open', what="alice's link open")

    def link_status(self):
        return self.alice.call('daemon.health')['brokers'].get('team', {}).get('status')

    def test_every_verb_with_a_reply_times_out_and_answers_again_after_sigcont(self):
        alice, bob_key = self.alice, self.bob_entry['pubkey']
        alice.call('state.set', {'key': 'before', 'value': 1})
        wait_for(lambda: call(alice, 'state.get', {'key': 'before'})[0],
                 what='the key set before the stop')
        sent = alice.call('send', {'to': bob_key, 'message': 'queued for bob'})
        cmid = sent['client_message_id']
        wait_for(lambda: any(row['client_message_id'] == cmid for row in alice.call(
            'outbox.list', {'status': 'done'})['items']), what='the DM accepted by the broker')

        self.broker.stop_signal()
        calls = [
            ('state.get', {'key': 'before'}),
            ('state.list', {}),
            ('memory.remember', {'content': 'said while the broker slept'}),
            ('memory.recall', {'query': 'slept'}),
            ('skills.list', {}),
            ('skills.get', {'name': 'deploy'}),
            ('skills.publish', {'name': 'deploy', 'instructions': 'make deb'}),
            ('skills.remove', {'name': 'deploy'}),
            ('members.kick', {'target': 'bob'}),
            ('members.disconnect', {'target': 'bob'}),
            ('members.ban', {'target': 'bob'}),
            ('members.unban', {'target': 'bob'}),
            ('members.bans', {}),
            ('grants.list', {}),
            # A full key still reads the roster first (resolver._full_key), which times out
            # to "no roster" after link_rpc_timeout; then the grants call times out too.
            ('grants.set', {'peer': bob_key, 'capabilities': ['read', 'dm']}),
            ('message.status', {'client_message_id': cmid}),
        ]
        jobs = [gevent.spawn(timed, alice, method, params) for method, params in calls]
        gevent.joinall(jobs, timeout=CALL_TIMEOUT + 5)
        outcomes = {method: job.get(block=False) for (method, _), job in zip(calls, jobs)}
        # The link never noticed: these were timeouts on an open link, not a closed one.
        self.assertEqual(self.link_status(), 'open')
        self.assertEqual(self.broker.process_state(), 'T')

        status, error, elapsed = outcomes.pop('message.status')
        self.assertIsNone(error, 'message.status never errors: %s' % error)
        self.assertEqual((status['delivery'], status['outbox_status']), ('unknown', 'done'))
        self.assertIn('did not answer', status['detail'])
        self.assertLess(elapsed, RPC_TIMEOUT + MARGIN)
        for method, (result, error, elapsed) in sorted(outcomes.items()):
            with self.subTest(method=method):
                self.assertIsNone(result, '%s answered while the broker was stopped' % method)
                self.assertEqual(error.slug, 'broker_timeout', error)
                self.assertIs(error.data.get('retryable'), True, error.data)
                self.assertEqual(error.data.get('mesh'), 'team', error.data)
                # It waited for the broker (nothing could have answered it sooner)…
                self.assertGreaterEqual(elapsed, RPC_TIMEOUT * 0.9)
                # …and no longer than its timeouts (grants.set has two in a row) allow.
                timeouts = 2 if method == 'grants.set' else 1
                self.assertLess(elapsed, timeouts * RPC_TIMEOUT + MARGIN)

        self.broker.cont()

        def answers():
            result, error = call(alice, 'state.get', {'key': 'before'})
            if error is not None and error.slug != 'broker_timeout':
                raise AssertionError('after SIGCONT: %s' % error)
            return result
        self.assertEqual(wait_for(answers, what='an answer after SIGCONT')['state']['value'], 1)
        self.assertEqual(self.link_status(), 'open')


# -- 2. no open link -------------------------------------------------------------------------

class NoLinkTest(MeshdTestCase):
    """A daemon whose only mesh names a broker port nobody listens on."""

    def setUp(self):
        super().setUp()
        self.write_config([make_mesh('team', 'ws://127.0.0.1:%d/ws' % free_port())])
        # A long RPC timeout: an answer that waited for it would stand out.
        self.daemon = self.start_daemon(timings=dict(DAEMON_TIMINGS, link_rpc_timeout=30.0))
        wait_for(lambda: self.daemon.call('daemon.health')['brokers']['team']['state']
                 == 'unreachable', what='the link found the broker unreachable')

    def test_every_call_answers_broker_unreachable_at_once(self):
        peer = crypto.generate_keypair()[0]
        fire_and_forget = [
            ('state.set', {'key': 'k', 'value': {'v': 1}}),
            ('memory.forget', {'id': 'memory-1'}),
            ('status.set', {'status': 'dnd'}),
            ('summary.set', {'summary': 'offline work'}),
            ('visible.set', {'visible': False}),
            ('profile.set', {'title': 'reviewer', 'capabilities': ['review']}),
            ('groups.join', {'name': '@reviewers', 'role': 'lead'}),
            ('groups.leave', {'name': '@reviewers'}),
        ]
        with_reply = [
            ('state.get', {'key': 'k'}),
            ('state.list', {}),
            ('memory.remember', {'content': 'nobody hears this'}),
            ('memory.recall', {'query': 'nobody'}),
            ('skills.list', {}),
            ('skills.get', {'name': 'deploy'}),
            ('skills.publish', {'name': 'deploy', 'instructions': 'make deb'}),
            ('skills.remove', {'name': 'deploy'}),
            ('members.kick', {'target': 'bob'}),
            ('members.disconnect', {'all': True}),
            ('members.ban', {'target': 'bob'}),
            ('members.unban', {'target': 'bob'}),
            ('members.bans', {}),
            ('grants.list', {}),
            # A full key: a name would answer peer_not_found (no roster to find it in).
            ('grants.set', {'peer': peer, 'capabilities': ['read']}),
            ('grants.block', {'peer': peer}),
            ('grants.revoke', {'peer': peer}),
        ]
        for method, params in fire_and_forget + with_reply:
            with self.subTest(method=method):
                result, error, elapsed = timed(self.daemon, method, params)
                self.assertIsNone(result, '%s succeeded without a link: %s' % (method, result))
                self.assertEqual(error.slug, 'broker_unreachable', error)
                self.assertEqual(error.code, -32005, error.error)
                self.assertEqual(error.data.get('mesh'), 'team', error.data)
                self.assertTrue(error.data.get('detail'), error.data)
                self.assertLess(elapsed, 10.0, 'it waited for a timeout')
                if method.split('.')[0] in ('status', 'summary', 'visible', 'profile',
                                            'groups'):
                    self.assertIn('saved, and sent when the link opens', error.data['detail'])
        # A DM still queues; its status is the outbox's, not an error.
        sent = self.daemon.call('send', {'to': peer, 'message': 'for later'})
        status = self.daemon.call('message.status',
                                  {'client_message_id': sent['client_message_id']})
        self.assertEqual((status['delivery'], status['outbox_status']), ('pending', 'pending'))


# -- 3. a broker that answers in claudemesh-daemon's shapes ----------------------------------

class ClaudemeshShapes:
    """Rewrites the frames one BrokerServer writes into what claudemesh's daemon waits for
    (spec/wire.md §4.4 QUIRK), strips `meshdExt` from its hello_ack and drops its `meshd_*`
    frames, as a claudemesh broker would (it has no extension and ignores their verbs).
    `seen` counts each rewrite, so a test knows they happened."""

    def __init__(self, broker):
        self.broker = broker
        self.seen = collections.Counter()
        self._gets = collections.Counter()      # get_state replies per key

    def install(self, test):
        """Wrap BrokerWebSocket.send_json (every JSON frame a broker writes) for the
        sockets of this broker only, until the test's cleanup."""
        original = BrokerWebSocket.send_json
        shapes = self

        def send_json(ws, frame):
            if ws in shapes.broker.sockets:
                frame = shapes.rewrite(frame)
                if frame is None:
                    return True
            return original(ws, frame)
        patcher = mock.patch.object(BrokerWebSocket, 'send_json', send_json)
        patcher.start()
        test.addCleanup(patcher.stop)

    def rewrite(self, frame):
        kind = frame.get('type')
        if isinstance(kind, str) and kind.startswith('meshd_'):
            self.seen['dropped ' + kind] += 1
            return None             # an extension frame: a claudemesh broker has none
        if kind == 'hello_ack' and 'meshdExt' in frame:
            self.seen['hello_ack without meshdExt'] += 1
            return {k: v for k, v in frame.items() if k != 'meshdExt'}
        rewrite = getattr(self, '_' + kind, None) if isinstance(kind, str) else None
        if rewrite is None:
            return frame
        reply = rewrite(copy.deepcopy(frame))
        if '_reqId' in frame:
            reply['_reqId'] = frame['_reqId']
        return reply

    def _state_result(self, frame):
        """state_value with `.state` and state_data with `.row` (snake_case fields), in
        turn for each key, so that reading a key twice meets both."""
        key = frame.get('key')
        self._gets[key] += 1
        found = bool(frame.get('updatedAt'))
        if self._gets[key] % 2:
            row = ({k: frame[k] for k in ('key', 'value', 'updatedBy', 'updatedAt')}
                   if found else None)
            reply = {'type': 'state_value', 'state': row}
        else:
            row = ({'key': frame['key'], 'value': frame['value'],
                    'updated_by': frame['updatedBy'], 'updated_at': frame['updatedAt']}
                   if found else None)
            reply = {'type': 'state_data', 'row': row}
        self.seen['%s %s' % (reply['type'], 'row' if found else 'null')] += 1
        return reply

    def _memory_stored(self, frame):
        self.seen['memory_stored.memoryId'] += 1
        return {'type': 'memory_stored', 'memoryId': frame['id']}

    def _memory_results(self, frame):
        self.seen['memory_recall_result.matches'] += 1
        return {'type': 'memory_recall_result', 'matches': frame['memories']}


def _without(row, *keys):
    return {k: v for k, v in row.items() if k not in keys}


def _unstamped(row, *stamps):
    """`row` without its timestamps, which must be there (non-empty strings)."""
    for stamp in stamps:
        if not (isinstance(row.get(stamp), str) and row[stamp]):
            raise AssertionError('no %s in %r' % (stamp, row))
    return _without(row, *stamps)


class ClaudemeshShapesTest(LinksTestCase):
    """The same scenario on meshd's broker and on one that answers in claudemesh-daemon's
    shapes without meshdExt, each with alice's and bob's daemons. The broker's models are
    bound to one database per process, so the two brokers run one after the other: meshd's
    (LinksTestCase's), stopped once its part is done, then the shaped one."""

    def side(self, broker, mesh):
        """alice's and bob's daemons on `mesh` of `broker`: (daemons, entries)."""
        entries = {name: enrol(broker.store, mesh, name).entry(broker.url)
                   for name in ('alice', 'bob')}
        return {name: self.daemon([entry]) for name, entry in entries.items()}, entries

    def wait_ok(self, daemon, method, params, accept=lambda result: True, what=None):
        """The result of the first call that succeeds and satisfies `accept`."""
        def attempt():
            result, _error = call(daemon, method, params)
            return result if result is not None and accept(result) else None
        return wait_for(attempt, what=what or method)

    def error_of(self, daemon, method, params):
        result, error = call(daemon, method, params)
        self.assertIsNone(result, '%s should have failed: %s' % (method, result))
        return {'code': error.slug, 'data': _without(error.data, 'code')}

    def scenario(self, alice, bob):
        """What alice and bob see of each other's shared data: the daemons' results, with
        memory ids and timestamps (which differ by nature) left out."""
        seen = {}
        seen['state.set'] = [alice.call('state.set', {'key': 'build',
                                                      'value': {'ok': True, 'n': 3}}),
                             alice.call('state.set', {'key': 'owner', 'value': 'alice'})]
        self.wait_ok(bob, 'state.get', {'key': 'owner'}, what='owner set')
        # Twice each: the claudemesh-shaped broker answers state_value, then state_data.
        seen['state.get'] = [_unstamped(bob.call('state.get', {'key': key})['state'],
                                        'updatedAt')
                             for key in ('build', 'build', 'owner', 'owner')]
        seen['state.get missing'] = [self.error_of(bob, 'state.get', {'key': 'nothing'})
                                     for _ in range(2)]
        seen['state.list'] = [_unstamped(entry, 'updatedAt')
                              for entry in bob.call('state.list')['entries']]

        stored = alice.call('memory.remember', {'content': 'The staging database lives on '
                                                           'db-7', 'tags': ['infra']})
        self.assertTrue(stored['id'])
        seen['memory.remember'] = _without(stored, 'id')
        matches = self.wait_ok(bob, 'memory.recall', {'query': 'staging DB-7'},
                               lambda result: result['matches'], 'the memory recalled')
        self.assertEqual([match['id'] for match in matches['matches']], [stored['id']])
        seen['memory.recall'] = dict(matches, matches=[
            _without(_unstamped(match, 'rememberedAt'), 'id') for match in matches['matches']])
        seen['memory.recall none'] = bob.call('memory.recall', {'query': 'nonexistentword'})
        seen['memory.forget'] = _without(alice.call('memory.forget', {'id': stored['id']}),
                                         'id')
        self.wait_ok(bob, 'memory.recall', {'query': 'staging'},
                     lambda result: result['matches'] == [], 'the memory forgotten')

        seen['skills.publish'] = alice.call('skills.publish', {
            'name': 'deploy', 'description': 'How we deploy', 'tags': ['ops'],
            'manifest': {'version': 2}, 'instructions': '1. make deb\n2. apt install it'})
        listed = bob.call('skills.list')
        seen['skills.list'] = dict(listed, skills=[_unstamped(skill, 'createdAt')
                                                   for skill in listed['skills']])
        seen['skills.list query'] = [skill['name'] for skill in bob.call(
            'skills.list', {'query': 'OPS'})['skills']]
        seen['skills.get'] = _unstamped(bob.call('skills.get', {'name': 'deploy'})['skill'],
                                        'createdAt')
        seen['skills.remove'] = [alice.call('skills.remove', {'name': 'deploy'}),
                                 alice.call('skills.remove', {'name': 'deploy'})]
        seen['skills.get missing'] = self.error_of(bob, 'skills.get', {'name': 'deploy'})
        return seen

    def send_delivered(self, daemons, entries):
        """A DM from alice to bob, in bob's inbox and done in alice's outbox: its id."""
        alice, bob = daemons['alice'], daemons['bob']
        sent = alice.call('send', {'to': entries['bob']['pubkey'], 'message': 'hi bob'})
        cmid = sent['client_message_id']
        self.wait_inbox(bob, 1)
        wait_for(lambda: any(row['client_message_id'] == cmid for row in alice.call(
            'outbox.list', {'status': 'done'})['items']), what='the DM done')
        return cmid

    def test_the_daemon_reads_claudemesh_shapes_as_it_reads_meshd_s(self):
        # meshd's broker: the scenario, then grants and message status, which it speaks.
        daemons, entries = self.side(self.broker, self.mesh)
        meshd = self.scenario(daemons['alice'], daemons['bob'])
        self.assertEqual(daemons['alice'].call('grants.list')['grants'], [])
        granted = daemons['alice'].call('grants.set', {'peer': entries['bob']['pubkey'],
                                                       'capabilities': ['read', 'dm']})
        self.assertEqual(granted['capabilities'], ['read', 'dm'])
        cmid = self.send_delivered(daemons, entries)
        self.wait_ok(daemons['alice'], 'message.status', {'client_message_id': cmid},
                     lambda status: status['delivery'] == 'delivered', 'delivered')
        for daemon in daemons.values():
            daemon.stop()
        self.broker.stop()

        # The claudemesh-shaped broker: the same scenario reads the same results.
        shaped = start_broker(self, timings=BROKER_TIMINGS)
        shapes = ClaudemeshShapes(shaped)
        shapes.install(self)
        daemons, entries = self.side(shaped, create_mesh(shaped.store, 'Team', slug='team'))
        claudemesh = self.scenario(daemons['alice'], daemons['bob'])
        self.assertEqual(claudemesh, meshd)
        # It really answered in those shapes.
        for rewrite in ('hello_ack without meshdExt', 'state_value row', 'state_data row',
                        'state_value null', 'state_data null', 'memory_stored.memoryId',
                        'memory_recall_result.matches'):
            self.assertTrue(shapes.seen[rewrite], (rewrite, shapes.seen))
        # What the scenario itself shows, so that two equal wrong answers cannot pass.
        self.assertEqual(meshd['state.get'][0], {'key': 'build', 'value': {'ok': True, 'n': 3},
                                                 'updatedBy': 'alice', 'mesh': 'team'})
        self.assertEqual([entry['key'] for entry in meshd['state.list']], ['build', 'owner'])
        self.assertEqual(meshd['state.get missing'][0]['code'], 'state_not_found')
        self.assertEqual(meshd['memory.recall']['matches'],
                         [{'content': 'The staging database lives on db-7', 'tags': ['infra'],
                           'rememberedBy': 'alice', 'mesh': 'team'}])
        self.assertEqual(meshd['skills.get']['manifest'], {'version': 2})
        self.assertEqual([r['removed'] for r in meshd['skills.remove']], [True, False])
        self.assertEqual(meshd['skills.get missing']['code'], 'skill_not_found')

        # Grants and message status need meshd extensions the shaped broker did not announce.
        bob_key = entries['bob']['pubkey']
        for method, params in (('grants.list', {}),
                               ('grants.set', {'peer': bob_key, 'capabilities': ['read']}),
                               ('grants.set', {'peer': 'bob', 'capabilities': ['read']})):
            with self.subTest(method=method, params=params):
                error = self.error_of(daemons['alice'], method, params)
                self.assertEqual((error['code'], error['data'].get('feature')),
                                 ('unsupported_by_broker', 'grants'))
        cmid = self.send_delivered(daemons, entries)
        status = daemons['alice'].call('message.status', {'client_message_id': cmid})
        self.assertEqual((status['delivery'], status['outbox_status'], status['delivered_at']),
                         ('unknown', 'done', None))
        self.assertNotIn('detail', status)      # not asked: the broker cannot say


if __name__ == '__main__':
    unittest.main()
