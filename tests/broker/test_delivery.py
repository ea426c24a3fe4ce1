"""Delivery conformance (spec/wire.md §4.1, §4.2, §7, §12 items 10–21)."""
import json
import unittest

from meshd import clock
from meshd import crypto
from meshd.broker import protocol
from meshd.broker.models import Member
from tests.base import wait_for
from tests.broker.base import BrokerTestMixin, dm_frame, multicast_frame


class DeliveryMixin(BrokerTestMixin):

    def setUp(self):
        super(DeliveryMixin, self).setUp()
        self.alice = self.member('alice')
        self.bob = self.member('bob')

    def send_ok(self, peer, frame):
        peer.send(frame)
        ack = peer.expect('ack', skip=('push',))
        self.assertEqual(list(ack), ['type', 'id', 'messageId', 'queued'])
        self.assertTrue(ack['queued'])
        return ack

    def send_refused(self, peer, frame, error):
        peer.send(frame)
        ack = peer.expect('ack', skip=('push',))
        self.assertEqual(ack, {'type': 'ack', 'id': frame.get('id', ''), 'messageId': '',
                               'queued': False, 'error': error})

    # ------------------------------------------------------------------ DMs

    def test_dm_to_session_key_decrypts_and_acks(self):
        alice_peer, _ = self.hello(self.alice)
        bob_session, _, (spub, ssec) = self.session(self.bob)
        frame = dm_frame(self.alice.sec, spub, 'hello session')
        ack = self.send_ok(alice_peer, frame)
        raw = bob_session.recv_raw_text()
        push = json.loads(raw)
        self.assertEqual(raw, protocol.encode(push))
        self.assertEqual(list(push), ['type', 'messageId', 'meshId', 'senderPubkey', 'priority',
                                      'nonce', 'ciphertext', 'createdAt', 'client_message_id',
                                      'request_fingerprint'])
        self.assertEqual(push['messageId'], ack['messageId'])
        self.assertEqual(push['senderPubkey'], self.alice.pub)
        self.assertEqual(push['client_message_id'], frame['client_message_id'])
        self.assertEqual(push['request_fingerprint'], frame['request_fingerprint'])
        self.assertRegex(push['createdAt'], r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$')
        self.assertEqual(crypto.open_dm(push['nonce'], push['ciphertext'], push['senderPubkey'], ssec),
                         b'hello session')
        bob_session.send({'type': 'client_ack', 'clientMessageId': push['client_message_id'],
                          'brokerMessageId': push['messageId']})
        wait_for(lambda: self.queue_rows(id=push['messageId'])[0].delivered_at is not None)
        # Reconnecting (a drain trigger) does not bring it back once acked.
        bob_session.close()
        again, _, _ = self.session(self.bob, session_keys=(spub, ssec), sessionId='new-sess')
        again.expect_nothing()

    def test_unacked_dm_is_pushed_again_on_reconnect(self):
        alice_peer, _ = self.hello(self.alice)
        keys = crypto.generate_keypair()
        bob_session, _, _ = self.session(self.bob, session_keys=keys)
        ack = self.send_ok(alice_peer, dm_frame(self.alice.sec, keys[0], 'again'))
        self.assertEqual(bob_session.expect('push')['messageId'], ack['messageId'])
        bob_session.close()                     # no client_ack
        again, _, _ = self.session(self.bob, session_keys=keys)
        push = again.expect('push')
        self.assertEqual(push['messageId'], ack['messageId'])
        self.assertEqual(crypto.open_dm(push['nonce'], push['ciphertext'], self.alice.pub, keys[1]),
                         b'again')

    def test_offline_member_receives_on_connect(self):
        alice_peer, _ = self.hello(self.alice)
        ack = self.send_ok(alice_peer, dm_frame(self.alice.sec, self.bob.pub, 'while away'))
        self.assertEqual(list(ack), ['type', 'id', 'messageId', 'queued'])   # same shape as online
        bob_peer, _ = self.hello(self.bob)
        push = bob_peer.expect('push', skip=())
        self.assertEqual(push['messageId'], ack['messageId'])
        self.assertEqual(crypto.open_dm(push['nonce'], push['ciphertext'], self.alice.pub,
                                        self.bob.sec), b'while away')

    def test_evicted_session_key_is_a_known_offline_recipient(self):
        self.broker.timings['broker_grace'] = 0.05
        keys = crypto.generate_keypair()
        bob_session, _, _ = self.session(self.bob, session_keys=keys)
        bob_session.close()
        wait_for(lambda: not self.broker.presences.all())      # evicted, row disconnected
        alice_peer, _ = self.hello(self.alice)
        ack = self.send_ok(alice_peer, dm_frame(self.alice.sec, keys[0], 'for the session'))
        bob_daemon, _ = self.hello(self.bob)
        bob_daemon.expect_nothing()                           # sealed to the session key only
        again, _, _ = self.session(self.bob, session_keys=keys)
        push = again.expect('push')
        self.assertEqual(push['messageId'], ack['messageId'])
        self.assertEqual(crypto.open_dm(push['nonce'], push['ciphertext'], self.alice.pub, keys[1]),
                         b'for the session')

    def test_offline_row_expires_after_ttl(self):
        alice_peer, _ = self.hello(self.alice)
        ack = self.send_ok(alice_peer, dm_frame(self.alice.sec, self.bob.pub, 'gone soon'))
        row = self.queue_rows(id=ack['messageId'])[0]
        self.assertAlmostEqual((row.expires_at - row.created_at).total_seconds(), self.broker.dm_ttl,
                               delta=1)
        with self.broker.store.connection():
            self.broker.delivery.expire(now=row.expires_at)
        # Kept, marked undelivered, until its sender's daemon was told (meshd extension).
        expired = self.queue_rows(id=ack['messageId'])[0]
        self.assertEqual((expired.undelivered_reason, expired.delivered_at), ('expired', None))
        bob_peer, _ = self.hello(self.bob)
        bob_peer.expect_nothing()

    def test_duplicate_send_is_queued_once(self):
        alice_peer, _ = self.hello(self.alice)
        frame = dm_frame(self.alice.sec, self.bob.pub, 'once')
        first = self.send_ok(alice_peer, frame)
        second = self.send_ok(alice_peer, frame)
        self.assertEqual(first['messageId'], second['messageId'])
        self.assertEqual(len(self.queue_rows(client_message_id=frame['client_message_id'])), 1)
        bob_peer, _ = self.hello(self.bob)
        self.assertEqual(bob_peer.expect('push')['messageId'], first['messageId'])
        bob_peer.expect_nothing()
        # Another fingerprint under the same id is a new send.
        other = dict(frame, request_fingerprint='0' * 64)
        third = self.send_ok(alice_peer, other)
        self.assertNotEqual(third['messageId'], first['messageId'])

    def test_duplicate_sent_before_the_first_is_acked_is_queued_once(self):
        """Sends are pipelined: the copy is read while the original is still being committed."""
        alice_peer, _ = self.hello(self.alice)
        bob_peer, _ = self.hello(self.bob)
        frame = dm_frame(self.alice.sec, self.bob.pub, 'once')
        alice_peer.send(frame)
        alice_peer.send(frame)
        acks = [alice_peer.expect('ack', skip=('push',)) for _ in range(2)]
        self.assertEqual({ack['messageId'] for ack in acks} - {''}, {acks[0]['messageId']})
        self.assertEqual(len(self.queue_rows(client_message_id=frame['client_message_id'])), 1)
        self.assertEqual(bob_peer.expect('push')['messageId'], acks[0]['messageId'])
        bob_peer.expect_nothing()

    def test_pipelined_sends_are_acked_and_pushed_in_send_order(self):
        alice_peer, _ = self.hello(self.alice)
        bob_peer, _ = self.hello(self.bob)
        frames = [dm_frame(self.alice.sec, self.bob.pub, 'n%02d' % n) for n in range(40)]
        for frame in frames:
            alice_peer.send(frame)
        acks = [alice_peer.expect('ack', skip=('push',)) for _ in frames]
        self.assertEqual([ack['id'] for ack in acks], [frame['id'] for frame in frames])
        self.assertTrue(all(ack['queued'] for ack in acks))
        pushes = [bob_peer.expect('push') for _ in frames]
        self.assertEqual([push['client_message_id'] for push in pushes],
                         [frame['client_message_id'] for frame in frames])
        self.assertEqual([push['messageId'] for push in pushes],
                         [ack['messageId'] for ack in acks])

    def test_refused_targets(self):
        alice_peer, _ = self.hello(self.alice)
        unknown, _ = crypto.generate_keypair()
        for target in (unknown, self.bob.pub[:16], 'bob', self.alice.pub, self.bob.pub.upper()):
            frame = dm_frame(self.alice.sec, self.bob.pub, 'x', targetSpec=target)
            self.send_refused(alice_peer, frame, protocol.ERR_NO_PEER)
        self.send_refused(alice_peer, dm_frame(self.alice.sec, self.bob.pub, 'x', targetSpec='#general'),
                          'invalid target: #topics are not supported by this broker')
        self.send_refused(alice_peer, dm_frame(self.alice.sec, self.bob.pub, 'x', priority='urgent'),
                          'invalid send: priority must be now|next|low')
        self.send_refused(alice_peer, dm_frame(self.alice.sec, self.bob.pub, 'x', nonce=5),
                          'invalid send: targetSpec, nonce and ciphertext must be strings')
        self.assertEqual(self.queue_rows(), [])

    def test_evicted_legacy_ephemeral_key_is_refused(self):
        self.broker.timings['broker_grace'] = 0.05
        eph, _ = crypto.generate_keypair()
        legacy, _ = self.hello(self.bob, sessionPubkey=eph)
        legacy.close()
        wait_for(lambda: not self.broker.presences.all())
        alice_peer, _ = self.hello(self.alice)
        self.send_refused(alice_peer, dm_frame(self.alice.sec, eph, 'x'), protocol.ERR_NO_PEER)

    def test_grant_block_refused_at_preflight(self):
        """D6: a session-keyed block refuses the DM before it is stored."""
        keys = crypto.generate_keypair()
        alice_session, _, _ = self.session(self.alice, session_keys=keys)
        with self.broker.store.connection():
            Member.update(peer_grants=json.dumps({keys[0]: []})).where(
                Member.id == self.bob.member_id).execute()
        self.send_refused(alice_session, dm_frame(keys[1], self.bob.pub, 'blocked'),
                          'blocked by recipient grants (sender lacks dm capability)')
        self.assertEqual(self.queue_rows(), [])

    # ------------------------------------------------------------------ claims

    def test_dead_presence_claim_is_repushed_to_live_sibling(self):
        """D3: a session that claimed a member-key DM dies; the daemon socket gets it at once."""
        alice_peer, _ = self.hello(self.alice)
        bob_session, _, _ = self.session(self.bob)
        ack = self.send_ok(alice_peer, dm_frame(self.alice.sec, self.bob.pub, 'claimed'))
        self.assertEqual(bob_session.expect('push')['messageId'], ack['messageId'])
        bob_daemon, _ = self.hello(self.bob)        # drains nothing: the row is claimed
        bob_session.reset()                          # TCP reset before client_ack
        push = bob_daemon.expect('push', skip=('peer_joined', 'peer_returned'))
        self.assertEqual(push['messageId'], ack['messageId'])   # sweeper is 600 s: close path did it

    def test_never_acking_client_is_not_resent_by_sweeper(self):
        self.broker.timings['broker_lease'] = 0.05
        self.broker.delivery.lease = 0.05
        alice_peer, _ = self.hello(self.alice)
        bob_peer, _ = self.hello(self.bob)
        self.send_ok(alice_peer, dm_frame(self.alice.sec, self.bob.pub, 'no ack'))
        bob_peer.expect('push')
        with self.broker.store.connection():
            wait_for(lambda: self.queue_rows()[0].claim_expires_at < clock.utcnow())
            self.broker._sweep_step()
        bob_peer.expect_nothing()
        bob_peer.send({'type': 'set_status', 'status': 'idle'})     # a real drain trigger
        bob_peer.expect('push')

    def test_priority_gating(self):
        alice_peer, _ = self.hello(self.alice)
        bob_peer, _ = self.hello(self.bob)
        bob_peer.send({'type': 'set_status', 'status': 'dnd'})
        bob_peer.send({'type': 'list_peers', '_reqId': 'sync'})     # frames are handled in order
        self.assertEqual(bob_peer.expect('peers_list')['peers'][1]['status'], 'dnd')
        self.send_ok(alice_peer, dm_frame(self.alice.sec, self.bob.pub, 'later', priority='low'))
        now_ack = self.send_ok(alice_peer, dm_frame(self.alice.sec, self.bob.pub, 'urgent',
                                                    priority='now'))
        push = bob_peer.expect('push')
        self.assertEqual((push['messageId'], push['priority']), (now_ack['messageId'], 'now'))
        bob_peer.expect_nothing()
        bob_peer.send({'type': 'set_status', 'status': 'idle'})
        self.assertEqual(bob_peer.expect('push')['priority'], 'low')

    # ------------------------------------------------------------------ multicast

    def test_broadcast_reaches_every_other_presence_once(self):
        carol = self.member('carol')
        alice_peer, _ = self.hello(self.alice)
        alice_session, _, _ = self.session(self.alice)
        bob_peer, _ = self.hello(self.bob)
        bob_session, _, (bspub, _) = self.session(self.bob)
        carol_peer, _ = self.hello(carol)
        ack = self.send_ok(alice_session, multicast_frame('*', 'hello everyone'))
        for peer in (bob_peer, bob_session, carol_peer):
            push = peer.expect('push', skip=('peer_joined',))
            while push.get('subtype') == 'system':
                push = peer.expect('push')
            self.assertEqual(list(push), ['type', 'messageId', 'meshId', 'senderPubkey',
                                          'senderMemberPubkey', 'senderMemberId', 'senderName',
                                          'priority', 'nonce', 'ciphertext', 'createdAt'])
            self.assertEqual(push['messageId'], ack['messageId'])
            self.assertEqual(push['senderMemberPubkey'], self.alice.pub)
            self.assertEqual(crypto.decode_plain(push['ciphertext']), b'hello everyone')
            peer.expect_nothing()
        for peer in (alice_peer, alice_session):
            while True:
                try:
                    frame = peer.recv(0.3)
                except Exception:
                    break
                self.assertEqual(frame.get('subtype'), 'system')    # only join events, never the message
        self.assertIsNotNone(self.queue_rows(id=ack['messageId'])[0].delivered_at)

    def test_group_ancestor_rule(self):
        alice_peer, _ = self.hello(self.alice)
        bob_peer, _ = self.hello(self.bob, groups=[{'name': 'eng/backend/db'}])
        carol = self.member('carol')
        carol_peer, _ = self.hello(carol, groups=[{'name': 'sales'}])
        for target in ('@eng', '@eng/backend', '@eng/backend/db', '@all'):
            ack = self.send_ok(alice_peer, multicast_frame(target, target, msg_id=target))
            push = bob_peer.expect('push', skip=('peer_joined',))
            while push.get('subtype') == 'system':
                push = bob_peer.expect('push')
            self.assertEqual(push['messageId'], ack['messageId'])
        self.send_ok(alice_peer, multicast_frame('@eng/front', 'no'))
        bob_peer.expect_nothing()
        frames = []
        while True:
            try:
                frames.append(carol_peer.recv(0.3))
            except Exception:
                break
        self.assertEqual([f.get('ciphertext') for f in frames if f.get('subtype') != 'system'],
                         [crypto.encode_plain(b'@all')[1]])

    def test_multicast_skips_invisible_and_blocked_and_peers_list_hides(self):
        carol = self.member('carol')
        alice_peer, _ = self.hello(self.alice)
        bob_peer, _ = self.hello(self.bob)
        carol_peer, _ = self.hello(carol)
        with self.broker.store.connection():
            Member.update(peer_grants=json.dumps({self.alice.pub: ['dm']})).where(
                Member.id == carol.member_id).execute()
        bob_peer.send({'type': 'set_visible', 'visible': False, '_reqId': 'v'})
        self.assertEqual(bob_peer.expect('ack', skip=('push',)),
                         {'type': 'ack', 'id': 'v', 'messageId': '', 'queued': False, '_reqId': 'v'})
        hidden = alice_peer.expect('peer_hidden', skip=('peer_joined',))
        self.assertEqual(hidden['eventData'], {'name': 'bob', 'pubkey': self.bob.pub})
        ack = self.send_ok(alice_peer, multicast_frame('*', 'nobody hears this'))
        for peer in (bob_peer, carol_peer):
            while True:
                try:
                    frame = peer.recv(0.3)
                except Exception:
                    break
                self.assertEqual(frame.get('subtype'), 'system', frame)
        self.assertIsNotNone(self.queue_rows(id=ack['messageId'])[0].delivered_at)
        alice_peer.send({'type': 'list_peers', '_reqId': 'p'})
        peers = alice_peer.expect('peers_list', skip=('push',))['peers']
        self.assertEqual([p['displayName'] for p in peers], ['alice', 'carol'])
        self.assertEqual(list(peers[0]), ['pubkey', 'memberPubkey', 'displayName', 'status',
                                          'summary', 'groups', 'sessionId', 'connectedAt', 'cwd',
                                          'peerRole', 'hostname', 'peerType', 'channel', 'visible'])
        bob_peer.send({'type': 'list_peers', '_reqId': 'own'})      # a caller still sees itself
        self.assertEqual(len(bob_peer.expect('peers_list', skip=('push',))['peers']), 3)

    def test_hook_status_holds_and_releases(self):
        alice_peer, _ = self.hello(self.alice)
        bob_peer, ack = self.hello(self.bob, cwd='/bob', pid=99)
        self.assertEqual(self.http_post('/hook/set-status', {'cwd': '/bob', 'pid': 99,
                                                             'status': 'working'}),
                         (200, {'ok': True, 'presence_id': ack['presenceId']}))
        held = self.send_ok(alice_peer, dm_frame(self.alice.sec, self.bob.pub, 'held'))
        bob_peer.expect_nothing()                   # a fresh hook `working` holds `next`
        self.assertEqual(self.http_post('/hook/set-status', {'cwd': '/bob', 'status': 'idle'})[1],
                         {'ok': True, 'presence_id': ack['presenceId']})
        self.assertEqual(bob_peer.expect('push')['messageId'], held['messageId'])
        self.assertEqual(self.http_post('/hook/set-status', {'cwd': '/bob'}),
                         (200, {'ok': False, 'error': 'cwd and status required'}))
        self.assertEqual(self.http_post('/hook/set-status', {'cwd': '/nowhere', 'status': 'idle'}),
                         (200, {'ok': True, 'pending': True}))

    # ------------------------------------------------------------------ limits

    def test_soft_frame_limit_keeps_socket(self):
        alice_peer, _ = self.hello(self.alice)
        frame = multicast_frame('*', 'x' * 52000)       # > 65 536 bytes once base64-encoded
        text = json.dumps(frame)
        self.assertGreater(len(text), 65536)
        alice_peer.send(text)
        ack = alice_peer.expect('ack')
        self.assertEqual(ack, {'type': 'ack', 'id': 'm1', 'messageId': '', 'queued': False,
                               'error': 'payload too large: %d bytes > MAX_MESSAGE_BYTES=65536'
                               % len(text.encode('utf-8'))})
        alice_peer.send(json.dumps({'type': 'list_peers', '_reqId': 'big', 'pad': 'y' * 70000}))
        err = alice_peer.expect('error')
        self.assertEqual(err['code'], 'payload_too_large')
        self.assertEqual(err['_reqId'], 'big')
        alice_peer.send({'type': 'list_peers', '_reqId': 'small'})
        self.assertEqual(alice_peer.expect('peers_list')['_reqId'], 'small')
        self.assertEqual(self.queue_rows(), [])

    def test_hard_frame_limit_closes_1009(self):
        alice_peer, _ = self.hello(self.alice)
        alice_peer.send('{"type":"send","pad":"' + 'z' * (1048576 + 10) + '"}')
        closed = alice_peer.expect_close()
        self.assertEqual((closed.code, closed.reason), (1009, 'Max payload size exceeded'))


class RateLimitMixin(BrokerTestMixin):
    broker_kwargs = {'rate_limit': '10:60'}

    def test_eleventh_send_is_rate_limited(self):
        alice, bob = self.member('alice'), self.member('bob')
        alice_peer, _ = self.hello(alice)
        self.hello(bob)
        for i in range(10):
            alice_peer.send(multicast_frame('*', 'n%d' % i, msg_id='r%d' % i))
            self.assertTrue(alice_peer.expect('ack', skip=('push',))['queued'])
        alice_peer.send(multicast_frame('*', 'n10', msg_id='r10'))
        ack = alice_peer.expect('ack', skip=('push',))
        self.assertEqual(ack, {'type': 'ack', 'id': 'r10', 'messageId': '', 'queued': False,
                               'error': 'rate_limit: max 60 msg/min (burst 10) \u2014 slow down'})


class DeliverySqliteTest(DeliveryMixin, unittest.TestCase):
    backend = 'sqlite'


class DeliveryPostgresTest(DeliveryMixin, unittest.TestCase):
    backend = 'postgresql'


class RateLimitSqliteTest(RateLimitMixin, unittest.TestCase):
    backend = 'sqlite'


class RateLimitPostgresTest(RateLimitMixin, unittest.TestCase):
    backend = 'postgresql'


if __name__ == '__main__':
    unittest.main()
