"""End to end: daemons exchanging messages through a real meshd broker (issue: links)."""
import signal

from rpc.protocol import encode, request

from meshd import crypto
from meshd.broker import admin
from meshd.broker.models import Member
from tests.base import create_mesh, wait_for
from tests.links_base import LinksTestCase


class DirectMessageTest(LinksTestCase):

    def test_member_to_member_both_ways(self):
        alice, bob = self.member('alice'), self.member('bob')
        da, db = self.daemon([alice]), self.daemon([bob])
        sent = da.call('send', {'to': bob['pubkey'], 'message': 'hi bob'})
        self.assertEqual((sent['status'], sent['duplicate'], sent['mesh']),
                         ('queued', False, 'team'))
        self.assertTrue(sent['recipient_online'])  # bob's daemon is connected
        row = self.wait_inbox(db, 1)[0]
        self.assertEqual((row['body'], row['sender_pubkey'], row['recipient_kind']),
                         ('hi bob', alice['pubkey'], 'member'))
        self.assertEqual(row['client_message_id'], sent['client_message_id'])
        db.call('send', {'to': alice['pubkey'], 'message': 'hi alice'})
        self.assertEqual(self.wait_inbox(da, 1)[0]['body'], 'hi alice')
        done = self.wait_outbox(da, 'done')[0]
        self.assertTrue(done['broker_message_id'])
        self.assertEqual(done['attempts'], 1)

    def test_session_to_session_between_two_daemons(self):
        alice, bob = self.member('alice'), self.member('bob')
        da, db = self.daemon([alice]), self.daemon([bob])
        token_a, key_a = self.session(da, alice, 'writer')
        token_b, key_b = self.session(db, bob, 'reviewer')
        writer = self.attached(da, token_a)
        sent = writer.call('send', {'to': 'reviewer', 'message': 'please review'})
        self.assertEqual((sent['target_spec'], sent['recipient_name'], sent['recipient_online']),
                         (key_b, 'reviewer', True))
        reviewer = self.attached(db, token_b)
        row = self.wait_inbox(db, 1, reviewer)[0]
        self.assertEqual((row['body'], row['sender_pubkey'], row['recipient_kind'],
                          row['recipient_pubkey']),
                         ('please review', key_a, 'session', key_b))
        reviewer.call('send', {'to': key_a, 'message': 'looks good'})
        self.assertEqual(self.wait_inbox(da, 1, writer)[0]['body'], 'looks good')

    def test_sibling_sessions_never_see_each_others_dms(self):
        alice, bob = self.member('alice'), self.member('bob')
        da, db = self.daemon([alice]), self.daemon([bob])
        token_1, _key_1 = self.session(db, bob, 'sibling-one')
        token_2, key_2 = self.session(db, bob, 'sibling-two')
        one, two = self.attached(db, token_1), self.attached(db, token_2)
        one.call('events.subscribe')
        two.call('events.subscribe')
        da.call('send', {'to': key_2, 'message': 'for two only'})
        self.assertEqual(self.wait_inbox(db, 1, two)[0]['body'], 'for two only')
        event = wait_for(lambda: self._next_message(two), what='message event for two')
        self.assertEqual(event['data']['body'], 'for two only')
        self.assertEqual(self.inbox(db, one), [])
        # A broadcast after it proves sibling one's stream is live and skipped the DM.
        da.call('send', {'to': '*', 'message': 'for all'})
        first = wait_for(lambda: self._next_message(one), what='broadcast event for one')
        self.assertEqual(first['data']['body'], 'for all')

    def _next_message(self, client):
        message = client.next_notification(timeout=30)
        if message.get('method') == 'event' and message['params']['kind'] == 'message':
            return message['params']
        return None

    def test_broadcast_reaches_every_other_session_once_and_never_echoes(self):
        alice, bob, carol = self.member('alice'), self.member('bob'), self.member('carol')
        da, db, dc = self.daemon([alice]), self.daemon([bob]), self.daemon([carol])
        token_a, _ = self.session(da, alice, 'a1')
        token_b1, _ = self.session(db, bob, 'b1')
        token_b2, _ = self.session(db, bob, 'b2')
        sender = self.attached(da, token_a)
        sent = sender.call('send', {'to': '*', 'message': 'standup in 5'})
        self.assertIsNone(sent['recipient_online'])
        for daemon, token in ((db, token_b1), (db, token_b2)):
            rows = self.wait_inbox(daemon, 1, self.attached(daemon, token))
            self.assertEqual([r['body'] for r in rows], ['standup in 5'])
        self.assertEqual([r['body'] for r in self.wait_inbox(dc, 1)], ['standup in 5'])
        # One member-scoped row per receiving daemon, whatever link carried each copy.
        wait_for(lambda: da.call('outbox.list', {'status': 'done'})['items'], what='ack')
        self.assertEqual(len(self.inbox(db)), 1)
        self.assertEqual(self.inbox(db)[0]['recipient_kind'], 'member')
        self.assertEqual(self.inbox(da), [])

    def test_offline_recipient_gets_the_dm_when_it_comes_back(self):
        alice, bob = self.member('alice'), self.member('bob')
        da = self.daemon([alice])
        sent = da.call('send', {'to': bob['pubkey'], 'message': 'while you were away'})
        self.assertFalse(sent['recipient_online'])
        self.wait_outbox(da, 'done')  # the broker stored it for the known offline member
        db = self.daemon([bob])
        self.assertEqual(self.wait_inbox(db, 1)[0]['body'], 'while you were away')

    def test_dm_to_a_key_nobody_knows_expires_dead_after_its_ttl(self):
        alice = self.member('alice')
        da = self.daemon([alice])
        stranger = crypto.generate_keypair()[0]
        sent = da.call('send', {'to': stranger, 'message': 'anyone?', 'ttl': 2})
        self.assertTrue(sent['expires_at'])
        row = self.wait_outbox(da, 'dead')[0]
        self.assertEqual(row['last_error'], 'expired')
        self.assertGreaterEqual(row['attempts'], 1)


class ResolutionTest(LinksTestCase):

    def setUp(self):
        super().setUp()
        self.other_mesh = create_mesh(self.broker.store, 'Other', slug='other')
        self.alice = self.member('alice')
        self.alice_other = self.member('alice-o', mesh=self.other_mesh)
        self.bob = self.member('bob')
        self.bob_other = self.member('bob-o', mesh=self.other_mesh)
        self.da = self.daemon([self.alice, self.alice_other])
        self.db = self.daemon([self.bob, self.bob_other])
        self.session(self.db, self.bob, 'builder')
        self.session(self.db, self.bob_other, 'builder')
        self.token_r, self.key_r = self.session(self.db, self.bob, 'reviewer')

    def outbox_count(self):
        return len(self.da.call('outbox.list')['items'])

    def error(self, params):
        with self.da.client() as client:
            answer = client.request('send', params)
        self.assertIn('error', answer, answer)
        return answer['error']

    def test_cross_mesh_outcomes(self):
        unique = self.da.call('send', {'to': 'reviewer', 'message': 'x'})
        self.assertEqual((unique['mesh'], unique['target_spec']), ('team', self.key_r))
        both = self.error({'to': 'builder', 'message': 'x'})
        self.assertEqual(both['data']['code'], 'mesh_required')
        self.assertEqual(sorted(both['data']['meshes']), ['other', 'team'])
        self.assertEqual(len(both['data']['candidates']), 2)
        scoped = self.da.call('send', {'to': 'builder', 'message': 'x', 'mesh': 'other'})
        self.assertEqual(scoped['mesh'], 'other')
        prefix = self.da.call('send', {'to': self.key_r[:10], 'message': 'x'})
        self.assertEqual(prefix['target_spec'], self.key_r)
        member_key = self.da.call('send', {'to': self.bob_other['pubkey'].upper(),
                                           'message': 'x'})
        self.assertEqual((member_key['mesh'], member_key['target_spec']),
                         ('other', self.bob_other['pubkey']))

    def test_ambiguous_and_not_found_and_bad_targets_leave_no_row(self):
        # Two builders of one member are that member (DESIGN.md 17); of two members, ambiguous.
        carol = self.member('carol')
        self.session(self.daemon([carol]), carol, 'builder')
        before = self.outbox_count()
        ambiguous = self.error({'to': 'builder', 'message': 'x', 'mesh': 'team'})
        self.assertEqual((ambiguous['data']['code'], ambiguous['data']['kind']),
                         ('ambiguous', 'name'))
        missing = self.error({'to': 'nobody-here', 'message': 'x',
                              'client_message_id': 'kept-free'})
        self.assertEqual(missing['data']['code'], 'peer_not_found')
        self.assertEqual(missing['message'], 'No peer matches "nobody-here" on any joined mesh')
        topic = self.error({'to': '#general', 'message': 'x'})
        self.assertEqual(topic['data']['code'], 'invalid_target')
        required = self.error({'to': '*', 'message': 'x'})
        self.assertEqual(required['data']['code'], 'mesh_required')
        unknown = self.error({'to': '*', 'message': 'x', 'mesh': 'nope'})
        self.assertEqual(unknown['data']['code'], 'mesh_not_attached')
        self.assertEqual(self.outbox_count(), before)
        # The refused key was not consumed.
        ok = self.da.call('send', {'to': 'reviewer', 'message': 'x',
                                   'client_message_id': 'kept-free'})
        self.assertFalse(ok['duplicate'])


class IdempotencyTest(LinksTestCase):

    def test_outcomes_in_every_outbox_state(self):
        alice, bob = self.member('alice'), self.member('bob')
        da = self.daemon([alice])
        self.daemon([bob])
        params = {'to': bob['pubkey'], 'message': 'once', 'client_message_id': 'k-1'}
        first = da.call('send', params)
        self.assertFalse(first['duplicate'])
        self.wait_outbox(da, 'done')
        again = da.call('send', params)
        self.assertEqual((again['status'], again['duplicate']), ('done', True))
        self.assertTrue(again['broker_message_id'])
        with da.client() as client:
            conflict = client.request('send', dict(params, message='changed'))['error']
        self.assertEqual((conflict['code'], conflict['message'], conflict['data']['reason']),
                         (-32003, 'idempotency_key_reused', 'outbox_done_fingerprint_mismatch'))
        self.assertEqual(len(conflict['data']['daemon_fingerprint_prefix']), 16)
        # pending: a target nobody can take keeps the row pending between attempts.
        pending = {'to': crypto.generate_keypair()[0], 'message': 'later',
                   'client_message_id': 'k-2'}
        da.call('send', pending)
        again = da.call('send', pending)
        self.assertEqual(again['duplicate'], True)
        self.assertIn(again['status'], ('queued', 'inflight'))
        with da.client() as client:
            reason = client.request('send', dict(pending, message='x'))['error']['data']['reason']
        self.assertIn(reason, ('outbox_pending_fingerprint_mismatch',
                               'outbox_inflight_fingerprint_mismatch'))
        # dead (expired) and aborted (requeued) keys are never reused.
        dead = {'to': crypto.generate_keypair()[0], 'message': 'gone',
                'client_message_id': 'k-3', 'ttl': 1}
        da.call('send', dead)
        wait_for(lambda: any(r['client_message_id'] == 'k-3' for r in
                             da.call('outbox.list', {'status': 'dead'})['items']), what='dead')
        with da.client() as client:
            self.assertEqual(client.request('send', dead)['error']['data']['reason'],
                             'outbox_dead_fingerprint_match')
            row = [r for r in da.call('outbox.list')['items']
                   if r['client_message_id'] == 'k-3'][0]
            da.call('outbox.requeue', {'id': row['id']})
            self.assertEqual(client.request('send', dead)['error']['data']['reason'],
                             'outbox_aborted_fingerprint_match')


    def test_two_sends_racing_with_one_key_make_one_row(self):
        """Pipelined, both sends look the key up before either commits: the unique key
        decides, and the loser answers as the winner's duplicate (or a conflict)."""
        alice, bob = self.member('alice'), self.member('bob')
        da = self.daemon([alice])
        same = {'to': bob['pubkey'], 'message': 'once', 'client_message_id': 'race-1'}
        changed = dict(same, client_message_id='race-2')
        with da.client() as client:
            client.send_raw(b''.join(encode(request(n, 'send', params)) for n, params in (
                (1, same), (2, same), (3, changed), (4, dict(changed, message='other')))))
            answers = {}
            while len(answers) < 4:
                message = client.read_message(timeout=30)
                answers[message['id']] = message
        self.assertEqual(sorted(answers[n]['result']['duplicate'] for n in (1, 2)),
                         [False, True])
        outcomes = sorted('error' in answers[n] for n in (3, 4))
        self.assertEqual(outcomes, [False, True])
        error = next(answers[n]['error'] for n in (3, 4) if 'error' in answers[n])
        self.assertEqual(error['data']['code'], 'conflict')
        rows = [r['client_message_id'] for r in da.call('outbox.list')['items']]
        self.assertEqual(sorted(rows), ['race-1', 'race-2'])


class LifecycleTest(LinksTestCase):

    def test_restart_transparency(self):
        alice, bob = self.member('alice'), self.member('bob')
        da, db = self.daemon([alice]), self.daemon([bob])
        proc = self.live_process()
        token, key = self.session(db, bob, 'worker', pid=proc.pid)
        self.assertEqual(self.run_cli('daemon', 'down', home=db.home).returncode, 0)
        for n in range(3):
            da.call('send', {'to': key, 'message': 'while down %d' % n})
        db = self.start_daemon(home=db.home, timings={'link_backoff_scale': 0.05})
        sessions = db.call('sessions.list')['sessions']
        self.assertEqual([(s['token_prefix'], s['presence']['session_pubkey']) for s in sessions],
                         [(token[:8], key)])
        client = self.attached(db, token)
        rows = self.wait_inbox(db, 3, client)
        self.assertEqual(sorted(r['body'] for r in rows),
                         ['while down 0', 'while down 1', 'while down 2'])
        wait_for(lambda: len(da.call('outbox.list', {'status': 'done'})['items']) == 3,
                 what='all acked')
        self.assertEqual(len(self.inbox(db)), 3)

    def test_sigkill_of_the_sender_with_rows_in_flight_delivers_each_once(self):
        alice, bob = self.member('alice'), self.member('bob')
        db = self.daemon([bob])
        da = self.daemon([alice])
        for n in range(20):
            da.call('send', {'to': bob['pubkey'], 'message': 'm%02d' % n})
        da.stop(signal.SIGKILL)
        da = self.start_daemon(home=da.home, timings={'link_backoff_scale': 0.05})
        wait_for(lambda: len(da.call('outbox.list', {'status': 'done'})['items']) == 20,
                 what='every row done after restart')
        self.wait_inbox(db, 20)
        wait_for(lambda: len(self.inbox(db)) == 20, what='twenty rows')
        self.assertEqual(sorted(r['body'] for r in self.inbox(db)),
                         ['m%02d' % n for n in range(20)])

    def test_sigkill_of_the_receiver_before_it_acks_redelivers_one_row(self):
        alice, bob = self.member('alice'), self.member('bob')
        da, db = self.daemon([alice]), self.daemon([bob])
        db.proc.send_signal(signal.SIGSTOP)  # receives nothing, acks nothing
        da.call('send', {'to': bob['pubkey'], 'message': 'are you there'})
        self.wait_outbox(da, 'done')
        db.stop(signal.SIGKILL)
        db = self.start_daemon(home=db.home, timings={'link_backoff_scale': 0.05})
        rows = self.wait_inbox(db, 1)
        self.assertEqual([r['body'] for r in rows], ['are you there'])

    def test_broker_restart_reattaches_links_and_drains_queued_rows(self):
        alice, bob = self.member('alice'), self.member('bob')
        da, db = self.daemon([alice]), self.daemon([bob])
        token, key = self.session(db, bob, 'worker')
        self.broker.stop()
        self.wait_link(da, 'team', 'reconnecting')
        da.call('send', {'to': bob['pubkey'], 'message': 'queued while the broker was down'})
        self.restart_broker()
        self.wait_link(da, 'team')
        self.wait_link(db, 'team')
        self.assertEqual(self.wait_inbox(db, 1)[0]['body'], 'queued while the broker was down')
        wait_for(lambda: db.call('daemon.health')['sessions'][token[:8]]['status'] == 'open',
                 what='session link back')
        da.call('send', {'to': key, 'message': 'to the session'})
        self.wait_inbox(db, 2)

    def test_an_unreachable_mesh_does_not_stall_another(self):
        dead_mesh = create_mesh(self.broker.store, 'Dead', slug='dead')
        alice, bob = self.member('alice'), self.member('bob')
        alice_dead = self.member('alice-d', mesh=dead_mesh, broker_url='ws://127.0.0.1:9/ws')
        da = self.daemon([alice, alice_dead], wait_open=False)
        self.wait_link(da, 'team')
        db = self.daemon([bob])
        for n in range(5):
            da.call('send', {'to': '*', 'message': 'stuck %d' % n, 'mesh': 'dead'})
        da.call('send', {'to': bob['pubkey'], 'message': 'still flowing', 'mesh': 'team'})
        self.assertEqual(self.wait_inbox(db, 1)[0]['body'], 'still flowing')
        health = da.call('daemon.health')['brokers']['dead']
        self.assertIn(health['status'], ('connecting', 'reconnecting'))
        self.assertEqual(health['state'], 'unreachable')
        self.assertEqual(len(da.call('outbox.list', {'status': 'pending'})['items']), 5)

    def test_revoked_member_stops_reconnecting(self):
        alice, bob = self.member('alice'), self.member('bob')
        da, db = self.daemon([alice]), self.daemon([bob])
        with self.broker.store.connection():
            admin.revoke_member(self.broker.store, 'team', bob['pubkey'])
        self.wait_link(db, 'team', 'closed')
        health = db.call('daemon.health')['brokers']['team']
        self.assertEqual(health['state'], 'banned')
        self.assertEqual(da.call('daemon.health')['brokers']['team']['status'], 'open')

    def test_join_attaches_a_mesh_to_a_running_daemon(self):
        bob = self.member('bob')
        db = self.daemon([bob])
        home = self.home
        daemon = self.start_daemon(timings={'link_backoff_scale': 0.05})
        with self.broker.store.connection():
            link = admin.invite(self.broker.store, 'team', self.broker.url)['link']
        result = self.run_cli('join', link, '--name', 'newcomer', home=home)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('✔ joined team', result.stdout)
        self.wait_link(daemon, 'team')
        daemon.call('send', {'to': bob['pubkey'], 'message': 'hello from the newcomer'})
        self.assertEqual(self.wait_inbox(db, 1)[0]['body'], 'hello from the newcomer')
        left = self.run_cli('leave', 'team', home=home)
        self.assertEqual(left.returncode, 0, left.stderr)
        wait_for(lambda: 'team' not in daemon.call('daemon.health')['brokers'],
                 what='team detached')

    def test_clock_jump_reconnects_every_link(self):
        alice = self.member('alice')
        # A zero threshold makes every check look like a jump: the test's stand-in for a
        # laptop waking up (the wall clock cannot be moved under a running test).
        da = self.daemon([alice], timings={'clock_jump_threshold': 0})
        da.wait_for_log('clock_jump_detected')
        wait_for(lambda: [l for l in da.log_lines() if l.get('msg') == 'broker_ws_reconnect_now'],
                 what='reconnect after the jump')
        self.wait_link(da, 'team')


class LinkStateTest(LinksTestCase):

    def test_a_first_connect_that_fails_still_reconnects_and_delivers(self):
        alice, bob = self.member('alice'), self.member('bob')
        port = self.broker.port
        self.broker.stop()
        da = self.daemon([alice], wait_open=False)
        wait_for(lambda: da.call('daemon.health')['brokers']['team']['state'] == 'unreachable',
                 what='unreachable state')
        # spec/daemon.md §1.6 step 10: one plain line on stderr, the link keeps trying.
        wait_for(lambda: 'broker connect failed for team: ' in da.stderr(), what='stderr line')
        self.assertEqual(da.stderr().count('broker connect failed for team'), 1)
        da.call('send', {'to': bob['pubkey'], 'message': 'sent before any connection',
                         'mesh': 'team'})
        self.start_broker(port)
        self.wait_link(da, 'team')
        db = self.daemon([bob])
        self.assertEqual(self.wait_inbox(db, 1)[0]['body'], 'sent before any connection')

    def test_an_identity_the_broker_does_not_know_shows_auth_failed(self):
        stranger = self.member('stranger')
        with self.broker.store.connection():
            Member.delete().where(Member.peer_pubkey == stranger['pubkey']).execute()
        da = self.daemon([stranger], wait_open=False)
        health = wait_for(lambda: (lambda h: h if h.get('state') == 'auth_failed' else None)(
            da.call('daemon.health')['brokers']['team']), what='auth_failed')
        self.assertIn('unauthorized', health['detail'])
        self.assertIsNotNone(health['retry_at'])
        listed = da.call('meshes.list')['meshes'][0]
        self.assertEqual((listed['slug'], listed['state']), ('team', 'auth_failed'))
        self.assertNotIn('secretKey', str(listed))

    def test_same_session_key_under_a_new_token_leaves_one_presence(self):
        alice, bob = self.member('alice'), self.member('bob')
        da, db = self.daemon([alice]), self.daemon([bob])
        session_id = '11111111-2222-4333-8444-555555555555'
        self.session(db, bob, 'relaunched', session_id=session_id)
        # A relaunch (launch --resume) while the old process still runs: a new token.
        self.session(db, bob, 'relaunched', session_id=session_id, replace=True)
        wait_for(lambda: len(db.call('daemon.health')['sessions']) == 1, what='one link')
        peers = wait_for(lambda: (lambda p: p if len(p) == 1 else None)(
            [p for p in da.call('peers.list')['peers'] if p['displayName'] == 'relaunched']),
            what='one presence for the relaunched session')
        self.assertEqual(peers[0]['peerRole'], 'session')
