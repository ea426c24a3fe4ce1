"""Presence conformance (spec/wire.md §4.3, §4.5, §7.6, §12 items 4, 7, 9, 13–14): grace, admin verbs,
keepalive, revocation and shutdown."""
import unittest

from meshd.broker import admin
from meshd.broker.models import Presence
from tests.base import wait_for
from tests.broker.base import BrokerTestMixin, dm_frame, hello_frame


class GraceMixin(BrokerTestMixin):
    timings = {'broker_grace': 1.0}

    def setUp(self):
        super(GraceMixin, self).setUp()
        self.alice = self.member('alice')
        self.bob = self.member('bob')

    def test_reattach_within_grace_is_silent(self):
        alice_peer, _ = self.hello(self.alice)
        bob_peer, _ = self.hello(self.bob)
        alice_peer.expect('peer_joined')
        self.broker.timings['broker_grace'] = 30.0
        bob_peer.close()
        wait_for(lambda: self.broker.presences.all()[-1].lease == 'offline')
        again, ack = self.hello(self.bob)               # same sessionId → silent reattach
        self.assertEqual(len(self.broker.presences.all()), 2)
        alice_peer.expect_nothing()
        again.send({'type': 'list_peers', '_reqId': 'p'})
        self.assertEqual(len(again.expect('peers_list')['peers']), 2)

    def test_beyond_grace_one_peer_left_then_peer_returned(self):
        alice_peer, _ = self.hello(self.alice)
        bob_peer, _ = self.hello(self.bob)
        alice_peer.expect('peer_joined')
        bob_peer.close()
        left = alice_peer.expect('peer_left')           # after the 1 s grace window
        self.assertEqual(left['eventData'], {'name': 'bob', 'pubkey': self.bob.pub})
        alice_peer.expect_nothing()
        again, ack = self.hello(self.bob)
        self.assertTrue(ack['restored'])
        self.assertEqual(list(ack), ['type', 'presenceId', 'memberDisplayName', 'memberProfile',
                                     'meshPolicy', 'restored', 'lastSummary', 'lastSeenAt',
                                     'restoredGroups', 'restoredStats', 'services'])
        returned = alice_peer.expect('peer_returned')
        self.assertEqual(list(returned['eventData']), ['name', 'pubkey', 'groups', 'lastSeenAt',
                                                       'summary'])
        alice_peer.expect_nothing()


class AdminVerbsMixin(BrokerTestMixin):

    def setUp(self):
        super(AdminVerbsMixin, self).setUp()
        self.owner = self.member('owner', role='admin')
        self.bob = self.member('bob')
        self.owner_peer, _ = self.hello(self.owner)

    def test_kick_closes_sessions_4001_and_skips_daemons(self):
        bob_daemon, _ = self.hello(self.bob)
        bob_session, _, _ = self.session(self.bob, displayName='bob')
        self.owner_peer.send({'type': 'kick', 'target': 'bob', '_reqId': 'k1'})
        ack = self.owner_peer.expect('kick_ack', skip=('push',))
        self.assertEqual(ack, {'type': 'kick_ack', 'kicked': ['bob'], 'affected': ['bob'],
                               'skipped_control_plane': ['bob'], '_reqId': 'k1'})
        closed = bob_session.expect_close()
        self.assertEqual((closed.code, closed.reason), (4001, 'kicked'))
        bob_daemon.send({'type': 'list_peers', '_reqId': 'still'})
        self.assertEqual(bob_daemon.expect('peers_list', skip=('push',))['_reqId'], 'still')

    def test_disconnect_closes_1000(self):
        bob_daemon, _ = self.hello(self.bob)
        self.owner_peer.send({'type': 'disconnect', 'target': self.bob.pub[:10]})
        ack = self.owner_peer.expect('disconnect_ack', skip=('push',))
        self.assertEqual(ack['affected'], ['bob'])
        closed = bob_daemon.expect_close()
        self.assertEqual((closed.code, closed.reason), (1000, 'disconnected'))

    def test_disconnect_all_and_kick_stale(self):
        bob_daemon, _ = self.hello(self.bob)
        bob_session, _, _ = self.session(self.bob, displayName='bob-s')
        self.owner_peer.send({'type': 'kick', 'stale': 3600000, '_reqId': 's'})
        self.assertEqual(self.owner_peer.expect('kick_ack', skip=('push',))['affected'], [])
        self.owner_peer.send({'type': 'disconnect', 'all': True, '_reqId': 'a'})
        ack = self.owner_peer.expect('disconnect_ack', skip=('push',))
        self.assertEqual(sorted(ack['affected']), ['bob', 'bob-s'])
        self.assertNotIn('skipped_control_plane', ack)
        for peer in (bob_daemon, bob_session):
            closed = peer.expect_close()
            self.assertEqual((closed.code, closed.reason), (1000, 'disconnected'))
        self.assertEqual([e.display_name for e in self.broker.presences.all()], ['owner'])

    def test_a_stale_beyond_any_date_selects_nobody(self):
        """Fuzzing: `stale` of 2^63 ms overflowed a timedelta and answered `internal`."""
        self.hello(self.bob)
        for verb in ('kick', 'disconnect'):
            self.owner_peer.send({'type': verb, 'stale': 2 ** 63, '_reqId': verb})
            self.assertEqual(self.owner_peer.expect(verb + '_ack', skip=('push',))['affected'], [])

    def test_a_group_name_of_thousands_of_levels_is_refused(self):
        """Fuzzing: join_group with 'a/' * 15000 made every drain and fan-out build every
        ancestor path (hundreds of MB, seconds each)."""
        bob_daemon, _ = self.hello(self.bob)
        bob_daemon.send({'type': 'join_group', 'name': 'a/' * 15000})
        bob_daemon.send({'type': 'join_group', 'name': 'ops', 'role': 'lead'})
        bob_daemon.send({'type': 'list_peers', '_reqId': 'sync'})
        bob_daemon.expect('peers_list', skip=('push',))
        entry = [e for e in self.broker.presences.all() if e.display_name == 'bob'][0]
        self.assertEqual(entry.groups, [{'name': 'ops', 'role': 'lead'}])

    def test_ban_closes_4002_and_blocks_hello(self):
        bob_daemon, _ = self.hello(self.bob)
        self.owner_peer.send({'type': 'ban', 'target': 'bob', '_reqId': 'b1'})
        self.assertEqual(self.owner_peer.expect('ban_ack', skip=('push',)),
                         {'type': 'ban_ack', 'banned': 'bob', '_reqId': 'b1'})
        closed = bob_daemon.expect_close()
        self.assertEqual((closed.code, closed.reason), (4002, 'banned'))
        again = self.connect()
        again.send(hello_frame(self.bob))
        self.assertEqual(again.recv()['code'], 'revoked')
        self.assertEqual(again.recv().code, 4002)
        self.owner_peer.send({'type': 'list_bans', '_reqId': 'l'})
        bans = self.owner_peer.expect('list_bans_result', skip=('push',))['bans']
        self.assertEqual([b['pubkey'] for b in bans], [self.bob.pub])

    def test_non_admin_is_forbidden(self):
        bob_daemon, _ = self.hello(self.bob)
        for verb in ('kick', 'disconnect'):
            bob_daemon.send({'type': verb, 'all': True, '_reqId': verb})
            self.assertEqual(bob_daemon.expect('error', skip=('push',)),
                             {'type': 'error', 'code': 'forbidden',
                              'message': 'only owner or admin can %s' % verb, '_reqId': verb})
        bob_daemon.send({'type': 'ban', 'target': 'owner'})
        self.assertEqual(bob_daemon.expect('error', skip=('push',))['message'],
                         'only owner or admin can ban')
        self.owner_peer.send({'type': 'ban', 'target': 'owner', '_reqId': 'self'})
        self.assertEqual(self.owner_peer.expect('error', skip=('push',))['message'],
                         'cannot ban yourself')

    def test_revoke_by_admin_cli_closes_within_a_sweep(self):
        bob_daemon, _ = self.hello(self.bob)
        with self.broker.store.connection():
            admin.revoke_member(self.broker.store, self.mesh_slug, self.bob.pub)
            self.broker._sweep_step()           # one sweeper step (the loop runs it every 15 s)
        error = bob_daemon.recv()
        self.assertEqual(error['code'], 'revoked')
        self.assertEqual(bob_daemon.recv().code, 4002)


class KeepaliveMixin(BrokerTestMixin):
    timings = {'broker_ping': 0.2, 'broker_pong_timeout': 1.5}

    def test_silent_peer_is_terminated_and_its_claims_repushed(self):
        alice, bob = self.member('alice'), self.member('bob')
        alice_peer, _ = self.hello(alice)
        bob_session, _, _ = self.session(bob)
        alice_peer.send(dm_frame(alice.sec, bob.pub, 'half-open'))
        ack = alice_peer.expect('ack', skip=('push',))
        # The session reads its push (answering pings meanwhile), then goes silent.
        self.assertEqual(bob_session.expect('push')['messageId'], ack['messageId'])
        bob_daemon, _ = self.hello(bob)
        push = bob_daemon.expect('push', skip=('peer_joined', 'peer_returned'), timeout=15)
        self.assertEqual(push['messageId'], ack['messageId'])
        bob_session.expect_dropped()


class ShutdownMixin(BrokerTestMixin):

    def test_stop_closes_every_socket_with_1001(self):
        alice = self.member('alice')
        peer, _ = self.hello(alice)
        pending = self.connect()                 # no hello yet
        self.broker.stop()
        for p in (peer, pending):
            closed = p.expect_close()
            self.assertEqual((closed.code, closed.reason), (1001, 'shutting down'))
        with self.broker.store.connection():
            self.assertEqual(Presence.select().where(
                Presence.disconnected_at.is_null()).count(), 0)


for _mixin in (GraceMixin, AdminVerbsMixin, KeepaliveMixin, ShutdownMixin):
    for _backend, _suffix in (('sqlite', 'SqliteTest'), ('postgresql', 'PostgresTest')):
        _name = _mixin.__name__.replace('Mixin', _suffix)
        globals()[_name] = type(_name, (_mixin, unittest.TestCase), {'backend': _backend})
del _mixin, _backend, _suffix, _name


if __name__ == '__main__':
    unittest.main()
