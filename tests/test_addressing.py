"""Names that work and presence that tells the truth (issue 12, DESIGN.md 17).

A quickstart-like mesh: a meshd broker, alice's daemon and bob's daemon without a session.
"""
import signal

from rpc.client import RpcCallError

from meshd import crypto
from tests.base import wait_for
from tests.links_base import LinksTestCase


class AddressingTestCase(LinksTestCase):

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.da = self.daemon([self.alice])
        self.db = self.daemon([self.bob])

    def member_inbox(self):
        """bob's rows addressed to his member key."""
        return [r for r in self.db.call('inbox.list', {})['items']
                if r['recipient_pubkey'] == self.bob['pubkey']]

    def send_when_known(self, to, text):
        """`send` once alice's daemon has seen `to` (rosters are read as links open)."""
        return wait_for(lambda: _sent(self.da, to, text), what='a send to %s' % to)

    def peers_of(self, daemon):
        return daemon.call('peers.list', {})['peers']


class MemberAddressingTest(AddressingTestCase):

    def test_a_name_and_a_prefix_reach_a_member_with_or_without_a_session(self):
        by_name = self.send_when_known('bob', 'by name')
        self.assertEqual((by_name['target_spec'], by_name['recipient_name'],
                          by_name['recipient_online'], by_name['recipient_unknown']),
                         (self.bob['pubkey'], 'bob', True, False))
        self.da.call('send', {'to': self.bob['pubkey'][:12], 'message': 'by prefix'})
        rows = wait_for(lambda: (lambda rows: rows if len(rows) >= 2 else None)(
            self.member_inbox()), what='both DMs in bob\'s member inbox')
        self.assertEqual(sorted(r['body'] for r in rows), ['by name', 'by prefix'])
        self.assertEqual({(r['sender_name'], r['sender_member_pubkey']) for r in rows},
                         {('alice', self.alice['pubkey'])})
        _token, session_key = self.session(self.db, self.bob, 'bob-session')
        wait_for(lambda: any(p['pubkey'] == session_key for p in self.peers_of(self.da)),
                 what='bob\'s session on alice\'s roster')
        again = self.da.call('send', {'to': 'bob', 'message': 'still the member'})
        self.assertEqual(again['target_spec'], self.bob['pubkey'])
        prefix = self.da.call('send', {'to': self.bob['pubkey'][:12], 'message': 'prefix'})
        self.assertEqual(prefix['target_spec'], self.bob['pubkey'])  # one member, not ambiguous
        session = self.da.call('send', {'to': 'bob-session', 'message': 'the session'})
        self.assertEqual(session['target_spec'], session_key)

    def test_meshd_inbox_names_the_dm_sender(self):
        self.send_when_known('bob', 'who sent this?')
        wait_for(self.member_inbox, what='the DM')
        shown = self.run_cli('inbox', home=self.db.home)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertIn('direct message from alice (%s)' % self.alice['pubkey'][:8], shown.stdout)

    def test_a_key_nobody_holds_is_queued_but_unknown_and_strict_refuses_it(self):
        stranger, _secret = crypto.generate_keypair()
        sent = self.da.call('send', {'to': stranger, 'message': 'anyone?'})
        self.assertTrue(sent['recipient_unknown'])
        self.assertEqual(sent['status'], 'queued')
        with self.assertRaises(RpcCallError) as refused:
            self.da.call('send', {'to': stranger, 'message': 'anyone?', 'strict': True})
        self.assertEqual(refused.exception.slug, 'recipient_unknown')
        known = self.send_when_known(self.bob['pubkey'], 'known')
        self.assertFalse(known['recipient_unknown'])


class OfflineMemberTest(AddressingTestCase):

    broker_timings = {'broker_grace': 0.5}    # an offline member leaves the roster at once

    def test_a_name_reaches_an_offline_member_from_the_address_book_across_restarts(self):
        self.send_when_known('bob', 'while online')
        wait_for(self.member_inbox, what='the first DM')
        self.db.stop()
        wait_for(lambda: not any(p['pubkey'] == self.bob['pubkey']
                                 for p in self.peers_of(self.da)), what='bob to leave')
        self.da.stop()
        self.da.start()                 # the address book is persisted
        self.wait_link(self.da, 'team')
        queued = self.da.call('send', {'to': 'bob', 'message': 'while offline'})
        self.assertEqual((queued['target_spec'], queued['recipient_online']),
                         (self.bob['pubkey'], False))
        listed = self.da.call('peers.list', {})
        self.assertIn(self.bob['pubkey'], [p['pubkey'] for p in listed['offline']])
        all_peers = self.run_cli('peers', '--all', home=self.da.home)
        self.assertIn('bob', all_peers.stdout)
        self.assertIn('offline', all_peers.stdout)
        self.db.start()
        wait_for(lambda: 'while offline' in [r['body'] for r in self.member_inbox()],
                 what='the queued DM after bob returns')


class HonestPresenceTest(AddressingTestCase):
    """LinksTestCase's broker keeps a dropped presence 60 s: longer than any wait here."""

    def test_a_session_that_ends_leaves_at_once_and_its_name_is_free_again(self):
        token, key = self.session(self.db, self.bob, 'r2')
        wait_for(lambda: any(p['pubkey'] == key for p in self.peers_of(self.da)),
                 what='r2 on alice\'s roster')
        self.db.call('sessions.deregister', {'token': token})
        wait_for(lambda: not any(p['pubkey'] == key for p in self.peers_of(self.da)),
                 what='r2 to leave without a grace window')
        _token, new_key = self.session(self.db, self.bob, 'r2')
        sent = wait_for(lambda: _sent(self.da, 'r2', 'hello again'), what='a send to r2')
        self.assertEqual(sent['target_spec'], new_key)

    def test_a_dropped_connection_still_gets_its_grace_window(self):
        _token, key = self.session(self.db, self.bob, 'dropped')
        wait_for(lambda: any(p['pubkey'] == key for p in self.peers_of(self.da)),
                 what='the session on alice\'s roster')
        self.db.stop(signal.SIGKILL)
        row = wait_for(lambda: next((p for p in self.peers_of(self.da)
                                     if p['pubkey'] == key and p.get('grace')), None),
                       what='the session in its grace window')
        self.assertEqual(row['displayName'], 'dropped')


def _sent(daemon, to, text):
    try:
        return daemon.call('send', {'to': to, 'message': text})
    except RpcCallError as exc:
        if exc.slug == 'peer_not_found':
            return None
        raise
