"""The meshd extensions `grants` and `message_status` (docs/wire-extensions.md): a member
edits its own per-sender grants, and a sender asks what became of one of its DMs."""
import unittest

from meshd.broker import protocol
from meshd.broker.member_verbs import MAX_GRANT_ENTRIES
from meshd.broker.models import Member
from tests.base import wait_for
from tests.broker.base import BrokerTestMixin, Closed, dm_frame, multicast_frame

DEFAULTS = ['read', 'dm', 'broadcast', 'state-read']
SYSTEM = ('peer_joined', 'peer_returned', 'peer_left')


def next_message(peer):
    """The next push that is a message; system events before it are skipped, anything
    else fails the test (a frame that should not have come)."""
    while True:
        frame = peer.recv()
        if isinstance(frame, Closed):
            raise AssertionError('closed %r while waiting for a message' % (frame,))
        if frame.get('type') == 'push' and frame.get('subtype') == 'system':
            continue
        if frame.get('type') == 'push':
            return frame
        raise AssertionError('expected a message push, got %r' % (frame,))


class MemberVerbsMixin(BrokerTestMixin):

    def setUp(self):
        super(MemberVerbsMixin, self).setUp()
        self.alice, self.bob, self.carol = self.member('alice'), self.member('bob'), self.member('carol')

    # ------------------------------------------------------------------ helpers

    def send_ok(self, peer, frame):
        peer.send(frame)
        ack = peer.expect('ack', skip=('push',))
        self.assertTrue(ack['queued'], ack)
        return ack

    def grants_set(self, peer, pubkey, caps, req_id='s'):
        peer.send({'type': 'meshd_grants_set', 'peer': pubkey, 'capabilities': caps,
                   '_reqId': req_id})
        reply = peer.expect('meshd_grants', skip=SYSTEM)
        self.assertEqual(reply['_reqId'], req_id)
        return reply['grants']

    def grants_get(self, peer, req_id='g'):
        peer.send({'type': 'meshd_grants_get', '_reqId': req_id})
        return peer.expect('meshd_grants', skip=SYSTEM)

    def stored_grants(self, ident):
        with self.broker.store.connection():
            return Member.grants_of(ident.member_id)

    def status(self, peer, req_id='st', **ids):
        peer.send(dict({'type': 'message_status', '_reqId': req_id}, **ids))
        while True:     # system events (peers joining) may come first
            frame = peer.recv()
            if isinstance(frame, Closed) or frame.get('type') != 'push' \
                    or frame.get('subtype') != 'system':
                return frame

    def expect_error(self, peer, code, req_id):
        error = peer.expect('error', skip=SYSTEM)
        self.assertEqual((error['code'], error.get('_reqId')), (code, req_id), error)
        return error

    # ------------------------------------------------------------------ announcement

    def test_hello_ack_announces_the_features(self):
        _, ack = self.hello(self.alice, meshdExt={'v': 1, 'features': ['undelivered']})
        self.assertEqual(ack['meshdExt']['features'],
                         ['undelivered', 'presence', 'grants', 'message_status'])
        _, plain = self.hello(self.bob)     # a claudemesh client hears of none
        self.assertNotIn('meshdExt', plain)

    # ------------------------------------------------------------------ grants

    def test_get_returns_defaults_and_no_entries(self):
        bob, _ = self.hello(self.bob)
        reply = self.grants_get(bob)
        self.assertEqual(list(reply), ['type', 'grants', 'defaults', '_reqId'])
        self.assertEqual(reply, {'type': 'meshd_grants', 'grants': {}, 'defaults': DEFAULTS,
                                 '_reqId': 'g'})

    def test_block_refuses_dms_and_skips_broadcasts_until_reset(self):
        # Hello order is fan-out order: bob's turn comes before carol's, so once carol
        # holds a broadcast, bob's was decided.
        alice, _ = self.hello(self.alice)
        bob, _ = self.hello(self.bob)
        carol, _ = self.hello(self.carol)
        self.assertEqual(self.grants_set(bob, self.alice.pub, []), {self.alice.pub: []})
        self.assertEqual(self.grants_get(bob)['grants'], {self.alice.pub: []})

        alice.send(dm_frame(self.alice.sec, self.bob.pub, 'blocked'))
        refused = alice.expect('ack', skip=('push',))
        self.assertEqual((refused['queued'], refused['error']), (False, protocol.ERR_BLOCKED))
        self.assertEqual(self.queue_rows(), [])

        first = self.send_ok(alice, multicast_frame('*', 'first', msg_id='b1'))
        self.assertEqual(next_message(carol)['messageId'], first['messageId'])
        # Reset to the defaults: a broadcast bob had received would fail this read.
        self.assertEqual(self.grants_set(bob, self.alice.pub, None), {})
        self.assertEqual(self.stored_grants(self.bob), {})
        second = self.send_ok(alice, multicast_frame('*', 'second', msg_id='b2'))
        self.assertEqual(next_message(bob)['messageId'], second['messageId'])
        self.assertEqual(next_message(carol)['messageId'], second['messageId'])

        ack = self.send_ok(alice, dm_frame(self.alice.sec, self.bob.pub, 'welcome back'))
        self.assertEqual(next_message(bob)['messageId'], ack['messageId'])

    def test_a_session_link_edits_its_members_grants(self):
        alice, _ = self.hello(self.alice)
        bob_session, _, _ = self.session(self.bob)
        self.grants_set(bob_session, self.alice.pub.upper(), ['read', 'read', 'state-read'])
        self.assertEqual(self.stored_grants(self.bob), {self.alice.pub: ['read', 'state-read']})
        alice.send(dm_frame(self.alice.sec, self.bob.pub, 'no dm capability'))
        self.assertEqual(alice.expect('ack', skip=('push',))['error'], protocol.ERR_BLOCKED)
        bob, _ = self.hello(self.bob)
        self.assertEqual(self.grants_get(bob)['grants'], {self.alice.pub: ['read', 'state-read']})

    def test_a_member_edits_only_its_own_grants(self):
        bob, _ = self.hello(self.bob)
        carol, _ = self.hello(self.carol)
        self.grants_set(bob, self.alice.pub, [])
        self.assertEqual(self.grants_get(carol)['grants'], {})
        # Fields naming another member are not part of the verb: carol's own grants change.
        carol.send({'type': 'meshd_grants_set', 'peer': self.alice.pub, 'capabilities': ['dm'],
                    'memberId': self.bob.member_id, 'member': self.bob.pub, '_reqId': 'c'})
        self.assertEqual(carol.expect('meshd_grants', skip=SYSTEM)['grants'],
                         {self.alice.pub: ['dm']})
        self.assertEqual(self.stored_grants(self.bob), {self.alice.pub: []})
        self.assertEqual(self.stored_grants(self.carol), {self.alice.pub: ['dm']})
        carol.send({'type': 'meshd_grants_get', 'memberId': self.bob.member_id, '_reqId': 'g2'})
        self.assertEqual(carol.expect('meshd_grants', skip=SYSTEM)['grants'],
                         {self.alice.pub: ['dm']})

    def test_invalid_grant_edits(self):
        bob, _ = self.hello(self.bob)
        pub = self.alice.pub
        bad = [{'capabilities': []},                                   # no peer
               {'peer': pub[:63], 'capabilities': []},
               {'peer': 'g' * 64, 'capabilities': []},
               {'peer': 7, 'capabilities': []},
               {'peer': pub},                                          # no capabilities
               {'peer': pub, 'capabilities': 'dm'},
               {'peer': pub, 'capabilities': [1]},
               {'peer': pub, 'capabilities': ['Read']},
               {'peer': pub, 'capabilities': ['-dm']},
               {'peer': pub, 'capabilities': ['a' * 33]},
               {'peer': pub, 'capabilities': ['dm', None]},
               {'peer': pub, 'capabilities': ['dm'] * 17}]
        for n, fields in enumerate(bad):
            bob.send(dict({'type': 'meshd_grants_set', '_reqId': 'bad%d' % n}, **fields))
            error = self.expect_error(bob, 'invalid', 'bad%d' % n)
            self.assertEqual(list(error), ['type', 'code', 'message', '_reqId'])
        self.assertEqual(self.stored_grants(self.bob), {})
        # Sixteen names of 32 characters are still fine.
        caps = ['a' + chr(ord('a') + n) * 31 for n in range(16)]
        self.assertEqual(self.grants_set(bob, pub, caps), {pub: caps})

    def test_entry_limit(self):
        bob, _ = self.hello(self.bob)
        full = {'%064x' % n: [] for n in range(MAX_GRANT_ENTRIES)}
        with self.broker.store.connection(), self.broker.store.writing():
            Member.set_grants(self.bob.member_id, full)
        bob.send({'type': 'meshd_grants_set', 'peer': self.alice.pub, 'capabilities': [],
                  '_reqId': 'over'})
        self.expect_error(bob, 'invalid', 'over')
        existing = '%064x' % 0
        self.assertEqual(self.grants_set(bob, existing, ['dm'])[existing], ['dm'])
        self.assertEqual(len(self.grants_set(bob, existing, None)), MAX_GRANT_ENTRIES - 1)
        self.assertIn(self.alice.pub, self.grants_set(bob, self.alice.pub, []))

    # ------------------------------------------------------------------ message_status

    def test_status_queued_then_delivered_after_client_ack(self):
        alice, _ = self.hello(self.alice)
        frame = dm_frame(self.alice.sec, self.bob.pub, 'status?')
        ack = self.send_ok(alice, frame)
        reply = self.status(alice, messageId=ack['messageId'])
        self.assertEqual(list(reply), ['type', 'messageId', 'clientMessageId', 'targetSpec',
                                       'status', 'createdAt', 'deliveredAt', 'expiresAt',
                                       'undeliveredReason', '_reqId'])
        self.assertEqual((reply['messageId'], reply['clientMessageId'], reply['targetSpec'],
                          reply['status'], reply['deliveredAt'], reply['undeliveredReason'],
                          reply['_reqId']),
                         (ack['messageId'], frame['client_message_id'], self.bob.pub, 'queued',
                          None, None, 'st'))
        self.assertRegex(reply['expiresAt'], r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$')
        bob, _ = self.hello(self.bob)
        push = next_message(bob)
        # Pushed but not acked: still queued.
        self.assertEqual(self.status(alice, messageId=ack['messageId'])['status'], 'queued')
        bob.send({'type': 'client_ack', 'brokerMessageId': push['messageId'],
                  'clientMessageId': push['client_message_id']})
        wait_for(lambda: self.queue_rows(id=ack['messageId'])[0].delivered_at is not None)
        done = self.status(alice, messageId=ack['messageId'])
        self.assertEqual(done['status'], 'delivered')
        self.assertRegex(done['deliveredAt'], r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$')

    def test_status_by_client_message_id(self):
        alice, _ = self.hello(self.alice)
        frame = dm_frame(self.alice.sec, self.bob.pub, 'one')
        first = self.send_ok(alice, frame)
        # The same client id with another body is another send: the newest one answers.
        second = self.send_ok(alice, dict(frame, request_fingerprint='0' * 64))
        self.assertNotEqual(first['messageId'], second['messageId'])
        cmid = frame['client_message_id']
        self.assertEqual(self.status(alice, clientMessageId=cmid)['messageId'],
                         second['messageId'])
        # The broker's id wins when both are given.
        both = self.status(alice, messageId=first['messageId'], clientMessageId=cmid)
        self.assertEqual(both['messageId'], first['messageId'])
        self.assertEqual(self.status(alice, messageId=first['messageId'],
                                     clientMessageId='unknown')['messageId'], first['messageId'])

    def test_status_of_another_members_message_is_not_found(self):
        alice, _ = self.hello(self.alice)
        carol, _ = self.hello(self.carol)
        frame = dm_frame(self.alice.sec, self.bob.pub, 'private')
        ack = self.send_ok(alice, frame)
        for n, ids in enumerate(({'messageId': ack['messageId']},
                                 {'clientMessageId': frame['client_message_id']},
                                 {'messageId': 'no-such-row'})):
            self.assertEqual(self.status(carol, req_id='nf%d' % n, **ids),
                             {'type': 'error', 'code': 'not_found',
                              'message': 'message not found', '_reqId': 'nf%d' % n})

    def test_status_of_a_multicast_is_delivered(self):
        alice, _ = self.hello(self.alice)
        ack = self.send_ok(alice, multicast_frame('@ops', 'to a group'))
        reply = self.status(alice, messageId=ack['messageId'])
        self.assertEqual((reply['status'], reply['targetSpec'], reply['clientMessageId']),
                         ('delivered', '@ops', None))
        self.assertEqual(reply['deliveredAt'], reply['createdAt'])

    def test_status_undelivered(self):
        alice, _ = self.hello(self.alice)
        ack = self.send_ok(alice, dm_frame(self.alice.sec, self.bob.pub, 'too late'))
        row = self.queue_rows(id=ack['messageId'])[0]
        # The sweeper's step at the row's expiry (the TTL itself is days long).
        with self.broker.store.connection():
            self.broker.delivery.mark_undelivered(now=row.expires_at)
        reply = self.status(alice, messageId=ack['messageId'])
        self.assertEqual((reply['status'], reply['deliveredAt'], reply['undeliveredReason']),
                         ('undelivered', None, 'expired'))

    def test_invalid_status_requests(self):
        alice, _ = self.hello(self.alice)
        for n, ids in enumerate(({}, {'messageId': ''}, {'clientMessageId': ''},
                                 {'messageId': 5}, {'messageId': 'x' * 257},
                                 {'messageId': None, 'clientMessageId': None},
                                 {'messageId': ['a'], 'clientMessageId': 'ok'})):
            reply = self.status(alice, req_id='iv%d' % n, **ids)
            self.assertEqual((reply['type'], reply['code'], reply['_reqId']),
                             ('error', 'invalid', 'iv%d' % n), reply)


class MemberVerbsSqliteTest(MemberVerbsMixin, unittest.TestCase):
    backend = 'sqlite'


class MemberVerbsPostgresTest(MemberVerbsMixin, unittest.TestCase):
    backend = 'postgresql'


if __name__ == '__main__':
    unittest.main()
