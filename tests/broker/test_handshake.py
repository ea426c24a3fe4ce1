"""Handshake conformance (spec/wire.md §3, §12 items 4–9): every rejection as the client reads it."""
import json
import unittest

from meshd import clock
from meshd import crypto
from meshd.broker import protocol
from meshd.broker.models import Member
from meshd.broker.presence import OFFLINE
from tests.base import wait_for
from tests.broker.base import (BrokerTestMixin, Closed, hello_frame, session_hello_frame)

NOW = 1800000000000


class HandshakeMixin(BrokerTestMixin):

    def setUp(self):
        super(HandshakeMixin, self).setUp()
        self.alice = self.member('alice', role='admin')

    def rejected(self, frame, code, message, close_code=1008, reason=None):
        """Send a hello frame; assert the exact error frame, then the close code and reason."""
        before = len(self.broker.presences.all())
        peer = self.connect()
        peer.send(frame)
        error = peer.recv()
        self.assertEqual(error, {'type': 'error', 'code': code, 'message': message})
        closed = peer.recv()
        self.assertIsInstance(closed, Closed)
        self.assertEqual((closed.code, closed.reason), (close_code, reason or code))
        self.assertEqual(len(self.broker.presences.all()), before)
        return peer

    def fixed_clock(self):
        self.broker.handshake.clock_ms = lambda: NOW

    # ------------------------------------------------------------------ hello

    def test_hello_ack_fields_and_order(self):
        peer = self.connect()
        peer.send(hello_frame(self.alice))
        raw = peer.recv_raw_text()
        ack = json.loads(raw)
        self.assertEqual(raw, protocol.encode(ack))     # compact JSON
        self.assertEqual(list(ack), ['type', 'presenceId', 'memberDisplayName', 'memberProfile',
                                     'meshPolicy', 'services'])
        self.assertRegex(ack['presenceId'], r'^[0-9A-Za-z]{32}$')
        self.assertEqual(ack['memberDisplayName'], 'alice')
        self.assertEqual(ack['memberProfile'], {'roleTag': None, 'groups': [], 'messageMode': 'push'})
        self.assertEqual(ack['meshPolicy'], {'selfEditable': protocol.DEFAULT_SELF_EDITABLE})
        self.assertEqual(ack['services'], [])

    def test_skew_boundary(self):
        self.fixed_clock()
        peer = self.connect()
        peer.send(hello_frame(self.alice, ts=NOW - 60000))
        self.assertEqual(peer.recv()['type'], 'hello_ack')
        self.rejected(hello_frame(self.alice, ts=NOW - 60001, sessionId='other'),
                      'timestamp_skew', 'hello rejected: timestamp_skew')
        self.rejected(hello_frame(self.alice, ts=NOW + 60001, sessionId='other2'),
                      'timestamp_skew', 'hello rejected: timestamp_skew')

    def test_string_timestamp_is_skew(self):
        frame = hello_frame(self.alice)
        frame['timestamp'] = str(frame['timestamp'])
        self.rejected(frame, 'timestamp_skew', 'hello rejected: timestamp_skew')

    def test_bad_signature(self):
        frame = hello_frame(self.alice)
        frame['signature'] = crypto.sign_hex(self.alice.sec, 'something else')
        self.rejected(frame, 'bad_signature', 'hello rejected: bad_signature')

    def test_malformed_signature_shape(self):
        frame = hello_frame(self.alice)
        frame['signature'] = 'abc'
        self.rejected(frame, 'malformed', 'hello rejected: malformed')

    def test_nonsense_in_unsigned_fields_is_malformed(self):
        """Finding 11: hellos with a pid of -1 or 10^30, or an object as hostname, were
        accepted, stored and listed to every peer."""
        for field, value in (('pid', -1), ('pid', 10 ** 30), ('pid', 1.5),
                             ('hostname', {'x': 1}), ('displayName', ['a']),
                             ('cwd', 'x' * 5000), ('sessionId', 's' * 300),
                             ('groups', [{'name': 7}]), ('groups', 'ops'), ('meshdExt', [1]),
                             ('model', 12)):
            self.rejected(hello_frame(self.alice, **{field: value}), 'malformed',
                          'hello rejected: malformed')
        self.assertEqual(self.connect_and_hello()['type'], 'hello_ack')

    def connect_and_hello(self):
        peer = self.connect()
        peer.send(hello_frame(self.alice, hostname='host', pid=2 ** 31 - 1, displayName='a'))
        return peer.recv()

    def test_a_replayed_hello_is_refused_within_its_window(self):
        """Finding 11: a captured hello could be replayed within its 60 s window."""
        frame = hello_frame(self.alice)
        first = self.connect()
        first.send(frame)
        self.assertEqual(first.expect('hello_ack')['type'], 'hello_ack')
        self.rejected(frame, 'replayed', 'hello rejected: replayed')
        keys = crypto.generate_keypair()
        session = session_hello_frame(self.alice, *keys)
        peer = self.connect()
        peer.send(session)
        peer.expect('hello_ack', skip=('peer_joined',))
        self.rejected(session, 'replayed', 'session_hello rejected: replayed')

    def test_missing_session_id_is_malformed(self):
        frame = hello_frame(self.alice)
        del frame['sessionId']
        self.rejected(frame, 'malformed', 'hello rejected: malformed')

    def test_bad_session_pubkey(self):
        frame = hello_frame(self.alice, sessionPubkey='AB' * 32)
        self.rejected(frame, 'bad_session_pubkey', 'sessionPubkey must be 64 lowercase hex chars')

    def test_unknown_member(self):
        stranger = self.member('stranger')
        stranger.pub, stranger.sec = crypto.generate_keypair()
        self.rejected(hello_frame(stranger), 'unauthorized', 'pubkey not found in mesh')

    def test_revoked_member_gets_4002(self):
        with self.broker.store.connection():
            Member.update(revoked_at=clock.utcnow()).where(
                Member.id == self.alice.member_id).execute()
        self.rejected(hello_frame(self.alice), 'revoked',
                      'You\'ve been removed from "Test Mesh". Contact the mesh owner to rejoin.',
                      close_code=4002, reason='banned')

    def test_frame_before_hello(self):
        peer = self.connect()
        peer.send({'type': 'list_peers'})
        self.assertEqual(peer.recv(), {'type': 'error', 'code': 'no_hello',
                                       'message': 'must send hello first'})
        peer.send(hello_frame(self.alice))
        self.assertEqual(peer.recv()['type'], 'hello_ack')

    def test_not_json_gets_error_and_socket_stays(self):
        peer = self.connect()
        peer.send('not json')
        self.assertEqual(peer.recv(), {'type': 'error', 'code': 'invalid_json',
                                       'message': 'frame is not a JSON object'})
        peer.send('[1,2]')
        self.assertEqual(peer.recv()['code'], 'invalid_json')
        peer.send(hello_frame(self.alice))
        self.assertEqual(peer.recv()['type'], 'hello_ack')

    def test_binary_frames_query_string_and_other_paths(self):
        import websocket
        from tests.broker.base import Peer
        peer = Peer(self.url + '?x=1')              # PATH_INFO is /ws: accepted
        self.addCleanup(peer.close)
        peer.send_raw(json.dumps(hello_frame(self.alice)).encode('utf-8'), websocket.ABNF.OPCODE_BINARY)
        self.assertEqual(peer.recv()['type'], 'hello_ack')
        with self.assertRaises(websocket.WebSocketBadStatusException) as ctx:
            Peer(self.url.replace('/ws', '/other'))
        self.assertEqual(ctx.exception.status_code, 404)

    # ------------------------------------------------------------------ session_hello

    def session_frame(self, **kw):
        pub, sec = crypto.generate_keypair()
        return session_hello_frame(self.alice, pub, sec, **kw), pub, sec

    def test_session_hello_ack(self):
        frame, pub, _ = self.session_frame()
        peer = self.connect()
        peer.send(frame)
        ack = peer.recv()
        self.assertEqual(list(ack), ['type', 'presenceId', 'memberDisplayName', 'memberProfile',
                                     'meshPolicy'])
        self.assertEqual(ack['memberDisplayName'], frame['displayName'])

    def test_session_skew_and_signature(self):
        self.fixed_clock()
        frame, pub, sec = self.session_frame(ts=NOW - 60001)
        self.rejected(frame, 'timestamp_skew', 'session_hello rejected: timestamp_skew')
        frame, pub, sec = self.session_frame(ts=NOW)
        frame['signature'] = crypto.sign_hex(self.alice.sec, 'x')   # wrong key
        self.rejected(frame, 'bad_signature', 'session_hello rejected: bad_signature')

    def test_attestation_mismatch(self):
        frame, pub, sec = self.session_frame()
        other_pub, _ = crypto.generate_keypair()
        frame['parentAttestation']['sessionPubkey'] = other_pub
        self.rejected(frame, 'attestation_mismatch',
                      'parentAttestation does not bind the claimed session+parent pubkeys')

    def test_attestation_expired_and_too_long(self):
        self.fixed_clock()
        frame, _, _ = self.session_frame(ts=NOW, expires_at=NOW)
        self.rejected(frame, 'expired', 'attestation rejected: expired')
        frame, _, _ = self.session_frame(ts=NOW, expires_at=NOW + 24 * 3600 * 1000 + 1)
        self.rejected(frame, 'ttl_too_long', 'attestation rejected: ttl_too_long')
        frame, _, _ = self.session_frame(ts=NOW, expires_at=NOW + 24 * 3600 * 1000)
        peer = self.connect()
        peer.send(frame)
        self.assertEqual(peer.recv()['type'], 'hello_ack')

    def test_attestation_bad_signature(self):
        frame, _, _ = self.session_frame()
        frame['parentAttestation']['signature'] = '00' * 64
        self.rejected(frame, 'bad_signature', 'attestation rejected: bad_signature')

    def test_bad_parent_pubkey(self):
        frame, _, _ = self.session_frame()
        frame['parentMemberPubkey'] = 'xyz'
        self.rejected(frame, 'bad_parent_pubkey', 'parentMemberPubkey must be 64 lowercase hex chars')

    def test_parent_member_id_mismatch(self):
        frame, pub, sec = self.session_frame(parentMemberId='not-the-id')
        self.rejected(frame, 'parent_member_id_mismatch',
                      'parentMemberId does not match parentMemberPubkey')

    def test_session_unknown_parent(self):
        ghost = self.member('ghost')
        ghost.pub, ghost.sec = crypto.generate_keypair()
        pub, sec = crypto.generate_keypair()
        self.rejected(session_hello_frame(ghost, pub, sec), 'unauthorized',
                      'parent pubkey not found in mesh')

    def test_session_missing_cwd_is_malformed(self):
        frame, _, _ = self.session_frame()
        del frame['cwd']
        self.rejected(frame, 'malformed', 'session_hello rejected: malformed')

    # ------------------------------------------------------------------ presence rules

    def test_join_events_recipients(self):
        bob = self.member('bob')
        alice_peer, _ = self.hello(self.alice)
        bob_peer, _ = self.hello(bob)
        joined = alice_peer.expect('peer_joined')
        self.assertEqual(joined['eventData'], {'name': 'bob', 'pubkey': bob.pub, 'groups': []})
        self.assertEqual(list(joined), ['type', 'subtype', 'event', 'eventData', 'messageId',
                                        'meshId', 'senderPubkey', 'priority', 'nonce',
                                        'ciphertext', 'createdAt'])
        # A session of alice: bob and alice's own daemon socket see it.
        session_peer, ack, (spub, _) = self.session(self.alice)
        self.assertEqual(alice_peer.expect('peer_joined')['eventData']['pubkey'], spub)
        self.assertEqual(bob_peer.expect('peer_joined')['eventData']['pubkey'], spub)
        # A second hello of alice's member (another daemon): bob sees it, alice's session does not.
        other, _ = self.hello(self.alice, sessionId='daemon-second')
        self.assertEqual(bob_peer.expect('peer_joined')['eventData']['pubkey'], self.alice.pub)
        session_peer.expect_nothing()

    def test_session_replaced(self):
        keys = crypto.generate_keypair()
        first, _, _ = self.session(self.alice, session_keys=keys)
        second, _, _ = self.session(self.alice, session_keys=keys, sessionId='another-id')
        closed = first.expect_close()
        self.assertEqual((closed.code, closed.reason), (1000, 'session_replaced'))
        self.assertEqual(len(self.broker.presences.all()), 1)

    def test_session_id_dedup(self):
        first, _ = self.hello(self.alice, sessionId='same')
        bob = self.member('bob')
        second, _ = self.hello(bob, sessionId='same')
        closed = first.expect_close()
        self.assertEqual((closed.code, closed.reason), (1000, 'session_replaced'))

    def test_socket_closed_during_hello_is_not_listed(self):
        """D2: a socket closed between binding and hello_ack never stays listed."""
        self.broker.lifecycle.fault_hooks['before_hello_ack'] = lambda entry: entry.ws.terminate()
        peer = self.connect()
        peer.send(hello_frame(self.alice))
        peer.expect_dropped()
        del self.broker.lifecycle.fault_hooks['before_hello_ack']
        self.assertEqual(self.broker.presences.all(), [])
        bob = self.member('bob')
        bob_peer, _ = self.hello(bob)
        bob_peer.send({'type': 'list_peers', '_reqId': 'q'})
        peers = bob_peer.expect('peers_list')['peers']
        self.assertEqual([p['memberPubkey'] for p in peers], [bob.pub])


    def test_presence_evicted_during_a_reattaching_hello_gives_a_new_presence(self):
        """On PostgreSQL the hello's reads yield: the presence it meant to reattach could be
        evicted meanwhile, and the socket was bound to an entry no longer registered."""
        first, _ = self.hello(self.alice, sessionId='laptop')
        old = self.broker.presences.all()[0]
        first.close()
        wait_for(lambda: old.lease == OFFLINE, what='offline lease')
        self.broker.lifecycle.fault_hooks['before_bind'] = lambda entry: self.broker.lifecycle.evict(
            entry, entry.grace_token)
        again, ack = self.hello(self.alice, sessionId='laptop')
        del self.broker.lifecycle.fault_hooks['before_bind']
        entries = self.broker.presences.all()
        self.assertEqual(len(entries), 1)
        self.assertIsNot(entries[0], old)
        self.assertTrue(entries[0].is_live)
        bob_peer, _ = self.hello(self.member('bob'))
        bob_peer.send({'type': 'list_peers', '_reqId': 'q'})
        peers = bob_peer.expect('peers_list', skip=('push',))['peers']
        self.assertIn(self.alice.pub, [p['memberPubkey'] for p in peers])

    def test_hello_that_fails_after_binding_closes_and_is_not_listed(self):
        """A hello that raised after binding answered `internal` and left the socket open,
        its presence online but never acked: unreachable, yet listed to peers."""
        def fail(entry):
            raise RuntimeError('injected')
        self.broker.lifecycle.fault_hooks['before_hello_ack'] = fail
        peer = self.connect()
        peer.send(hello_frame(self.alice))
        self.assertEqual(peer.recv(), {'type': 'error', 'code': 'internal',
                                       'message': 'internal error'})
        self.assertEqual(peer.expect_close().code, 1011)
        del self.broker.lifecycle.fault_hooks['before_hello_ack']
        bob = self.member('bob')
        bob_peer, _ = self.hello(bob)
        bob_peer.send({'type': 'list_peers', '_reqId': 'q'})
        peers = bob_peer.expect('peers_list')['peers']
        self.assertEqual([p['memberPubkey'] for p in peers], [bob.pub])

    def test_capacity_never_leaks(self):
        """D1: entries removed by kick, ban and sessionId de-dup free their capacity at once."""
        self.broker.handshake.max_per_mesh = 4
        admin_peer, _ = self.hello(self.alice)
        bob, carol = self.member('bob'), self.member('carol')
        s1, _, _ = self.session(bob, displayName='s1')
        s2, _, _ = self.session(carol, displayName='s2')
        d1, _ = self.hello(bob, sessionId='dup')
        full = self.connect()
        full.send(hello_frame(carol, sessionId='c-daemon'))
        self.assertEqual(full.recv(), {'type': 'error', 'code': 'capacity',
                                       'message': 'mesh at connection capacity'})
        self.assertEqual(full.recv().code, 1008)
        admin_peer.send({'type': 'kick', 'target': 's1', '_reqId': 'k'})
        self.assertEqual(admin_peer.expect('kick_ack', skip=('push',))['affected'], ['s1'])
        admin_peer.send({'type': 'ban', 'target': 'carol', '_reqId': 'b'})
        admin_peer.expect('ban_ack', skip=('push',))
        d2, _ = self.hello(bob, sessionId='dup')        # de-dup replaces d1
        self.assertEqual(d1.expect_close().reason, 'session_replaced')
        dave, erin = self.member('dave'), self.member('erin')
        self.hello(dave)
        self.hello(erin)
        self.assertEqual(len(self.broker.presences.in_mesh(self.mesh_id)), 4)


class HandshakeSqliteTest(HandshakeMixin, unittest.TestCase):
    backend = 'sqlite'


class HandshakePostgresTest(HandshakeMixin, unittest.TestCase):
    backend = 'postgresql'


if __name__ == '__main__':
    unittest.main()
