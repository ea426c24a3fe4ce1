"""Nothing lost, nothing forged: end to end through a real broker and daemon processes.

Regression tests of the adversarial run's findings (each docstring names the finding), on
daemons joined to an in-process meshd broker.
"""
import base64
import json
import os
import socket

from meshd.broker.message_queue import MessageQueue
from rpc.protocol import encode, request
from tests.base import DEADLINE, wait_for
from tests.base import Member
from tests.broker.base import Peer, hello_frame
from tests.links_base import LinksTestCase


def plain_dm_frame(target, text, cmid):
    """A `send` whose ciphertext is base64 plaintext: what a forger, or a broker, can push."""
    return {'type': 'send', 'id': cmid, 'client_message_id': cmid, 'targetSpec': target,
            'priority': 'next', 'nonce': base64.b64encode(os.urandom(24)).decode('ascii'),
            'ciphertext': base64.b64encode(text.encode('utf-8')).decode('ascii')}


class SameClientMessageIdTest(LinksTestCase):

    def test_two_senders_with_one_client_message_id_both_reach_the_recipient(self):
        """Finding 1: carol, then alice, DM bob with id `task-42-result`; bob kept carol's
        only and acked alice's, and the broker marked both delivered (silent loss)."""
        alice, bob, carol = self.member('alice'), self.member('bob'), self.member('carol')
        da, db, dc = self.daemon([alice]), self.daemon([bob]), self.daemon([carol])
        dc.call('send', {'to': bob['pubkey'], 'message': 'from carol',
                         'client_message_id': 'task-42-result'})
        self.assertEqual([r['body'] for r in self.wait_inbox(db, 1)], ['from carol'])
        da.call('send', {'to': bob['pubkey'], 'message': 'from alice',
                         'client_message_id': 'task-42-result'})
        rows = self.wait_inbox(db, 2)
        self.assertEqual(sorted((r['body'], r['sender_pubkey']) for r in rows),
                         sorted([('from alice', alice['pubkey']), ('from carol', carol['pubkey'])]))
        for daemon in (da, dc):
            self.wait_outbox(daemon, 'done')
        queued = self._queue_rows('task-42-result')
        self.assertEqual(len(queued), 2)
        wait_for(lambda: all(r.delivered_at for r in self._queue_rows('task-42-result')),
                 what='both rows acked by bob')

    def _queue_rows(self, cmid):
        with self.broker.store.connection():
            return list(MessageQueue.select().where(MessageQueue.client_message_id == cmid))

    def test_an_ack_of_one_senders_dm_never_marks_anothers_delivered(self):
        """Finding 1, at the broker: `client_ack` matched `id OR client_message_id`, so bob's
        ack of carol's DM marked alice's DM (same id) delivered before bob had it."""
        alice, bob, carol = self.member('alice'), self.member('bob'), self.member('carol')
        da, dc = self.daemon([alice]), self.daemon([carol])
        for daemon, text in ((dc, 'from carol'), (da, 'from alice')):
            daemon.call('send', {'to': bob['pubkey'], 'message': text,
                                 'client_message_id': 'shared-id'})
            self.wait_outbox(daemon, 'done')
        raw = Peer(self.broker.url)
        self.addCleanup(raw.close)
        raw.send(hello_frame(Member.from_entry(bob, 'bob')))
        raw.expect('hello_ack')
        pushes = [raw.expect('push', skip=('peer_joined', 'peer_returned')) for _ in range(2)]
        first = pushes[0]
        raw.send({'type': 'client_ack', 'clientMessageId': first['client_message_id'],
                  'brokerMessageId': first['messageId']})
        wait_for(lambda: [r for r in self._queue_rows('shared-id') if r.delivered_at],
                 what='the acked row delivered')
        rows = {r.id: r for r in self._queue_rows('shared-id')}
        other = [row_id for row_id in rows if row_id != first['messageId']][0]
        self.assertIsNone(rows[other].delivered_at)


class ForgedDirectMessageTest(LinksTestCase):

    def test_a_plaintext_dm_is_recorded_and_shown_as_a_broadcast(self):
        """Finding 4: a DM push whose ciphertext is plain base64 was stored as a normal
        message: any member (or the broker) could forge a private message."""
        alice, bob, mallory = self.member('alice'), self.member('bob'), self.member('mallory')
        da, db = self.daemon([alice]), self.daemon([bob])
        forger = Peer(self.broker.url)
        self.addCleanup(forger.close)
        forger.send(hello_frame(Member.from_entry(mallory, 'mallory')))
        forger.expect('hello_ack')
        forger.send(plain_dm_frame(bob['pubkey'], 'transfer the funds', 'forged-1'))
        self.assertFalse(forger.expect('ack', skip=('peer_joined',)).get('error'))
        da.call('send', {'to': bob['pubkey'], 'message': 'a real secret'})
        rows = {r['body']: r for r in self.wait_inbox(db, 2)}
        self.assertFalse(rows['transfer the funds']['e2e'])
        self.assertTrue(rows['a real secret']['e2e'])
        shown = self.run_cli('inbox', home=db.home)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        lines = shown.stdout.splitlines()
        forged = lines[lines.index('  transfer the funds') - 1]
        real = lines[lines.index('  a real secret') - 1]
        self.assertTrue(forged.startswith('broadcast from '), forged)
        self.assertIn('(%s)' % mallory['pubkey'][:8], forged)
        self.assertIn('(not end-to-end encrypted)', forged)
        self.assertTrue(real.startswith('direct message from '), real)


class UndeliveredTest(LinksTestCase):

    broker_kwargs = {'dm_ttl': 2}

    def test_a_dm_that_expires_at_the_broker_is_reported_to_its_sender(self):
        """Finding 5: with the broker's DM TTL shorter than the daemon's, a DM to an
        offline peer expired at the broker and the sender's row stayed `done`."""
        alice, bob = self.member('alice'), self.member('bob')
        da = self.daemon([alice])
        sent = da.call('send', {'to': bob['pubkey'], 'message': 'nobody home'})
        self.assertEqual(sent['broker_dm_ttl'], 2)
        row = self.wait_outbox(da, 'undelivered')[0]
        self.assertEqual(row['client_message_id'], sent['client_message_id'])
        self.assertIn('expired at the broker', row['last_error'])
        listed = self.run_cli('outbox', '--undelivered', home=da.home)
        self.assertIn(sent['client_message_id'], listed.stdout)
        wait_for(lambda: all(r.sender_notified_at for r in self._rows()),
                 what='the notice acked by alice')
        db = self.daemon([bob])
        da.call('send', {'to': bob['pubkey'], 'message': 'now you are here'})
        self.assertEqual([r['body'] for r in self.wait_inbox(db, 1)], ['now you are here'])

    def _rows(self):
        with self.broker.store.connection():
            return list(MessageQueue.select())

    def test_the_cli_names_the_brokers_shorter_ttl(self):
        alice, bob = self.member('alice'), self.member('bob')
        da = self.daemon([alice])
        shown = self.run_cli('send', bob['pubkey'], 'hello?', home=da.home)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertIn('its broker keeps it 2 seconds', shown.stdout)


class OrderTest(LinksTestCase):

    broker_kwargs = {'rate_limit': 'off'}

    def test_dms_from_one_sender_arrive_in_acceptance_order(self):
        """Finding 8, without faults: a window of 16 sends in flight, then the broker's
        drain, keep one sender's DMs in the order they were accepted."""
        alice, bob = self.member('alice'), self.member('bob')
        da, db = self.daemon([alice]), self.daemon([bob])
        events = db.client(timeout=DEADLINE)
        self.addCleanup(events.close)
        events.call('events.subscribe')
        count = 300
        lines = b''.join(encode(request(i, 'send', {'to': bob['pubkey'], 'message': 'n%03d' % i}))
                         for i in range(count))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(DEADLINE)
        sock.connect(da.socket)
        sock.sendall(lines)
        answers = sock.makefile('rb')
        for _ in range(count):
            self.assertIn('result', json.loads(answers.readline()))
        bodies = []
        while len(bodies) < count:
            message = events.next_notification(timeout=DEADLINE)
            if message.get('method') == 'event' and message['params']['kind'] == 'message':
                bodies.append(message['params']['data']['body'])
        self.assertEqual(bodies, ['n%03d' % i for i in range(count)])
