"""Everything a mesh shares, end to end: two real daemons on one real meshd broker, on SQLite
and on PostgreSQL (docs/local-api.md, "Shared data, presence, moderation, grants and message
status"; spec/wire.md §4.3–4.5).
"""
import time
import unittest

from rpc.client import RpcCallError

from tests.base import DEADLINE, pg_url, start_broker, wait_for
from tests.links_base import BROKER_TIMINGS, LinksTestCase


class SharedDataMixin:
    """alice and bob, each with a daemon on mesh `team` of one broker."""

    backend = 'sqlite'
    # A stopped daemon's presence ends after one second, so a restarted daemon starts a
    # fresh presence that shows only what the daemon sends again.
    broker_timings = {'broker_grace': 1.0}
    # Rosters are polled while someone watches events: peer_changed needs no peers.list.
    daemon_timings = {'roster_poll_interval': 0.5}

    def start_broker(self, port):
        if self.backend != 'postgresql':
            return super().start_broker(port)
        timings = dict(BROKER_TIMINGS, **self.broker_timings)
        self.broker = start_broker(self, pg_url(), port=port, timings=timings)
        return self.broker

    def setUp(self):
        super().setUp()
        self.alice_entry = self.member('alice')
        self.bob_entry = self.member('bob')
        self.alice = self.daemon([self.alice_entry], timings=self.daemon_timings)
        self.bob = self.daemon([self.bob_entry], timings=self.daemon_timings)

    def events_of(self, daemon):
        """A client subscribed to `daemon`'s events; returns a function that waits for the
        first event of `kind` matching `match`."""
        client = daemon.client(timeout=30.0)
        self.addCleanup(client.close)
        client.call('events.subscribe', {})

        def wait_event(kind, match=lambda data: True):
            deadline = time.monotonic() + DEADLINE
            while True:
                if time.monotonic() > deadline:
                    self.fail('no %s event within %ss' % (kind, DEADLINE))
                note = client.next_notification(timeout=DEADLINE)
                if note.get('method') != 'event':
                    continue
                event = note['params']
                if event['kind'] == kind and match(event['data']):
                    return event['data']
        return wait_event

    def assert_error(self, code, fn, *args):
        with self.assertRaises(RpcCallError) as caught:
            fn(*args)
        self.assertEqual(caught.exception.data.get('code'), code, caught.exception)
        return caught.exception

    # -- state ---------------------------------------------------------------------------

    def test_state_set_by_one_is_read_and_announced_to_the_other(self):
        wait_event = self.events_of(self.bob)
        result = self.alice.call('state.set', {'key': 'build', 'value': {'ok': True, 'n': 3}})
        self.assertEqual(result, {'ok': True, 'key': 'build', 'mesh': 'team'})
        change = wait_event('state_change', lambda d: d['key'] == 'build')
        self.assertEqual((change['mesh'], change['value'], change['updated_by']),
                         ('team', {'ok': True, 'n': 3}, 'alice'))
        state = self.bob.call('state.get', {'key': 'build'})['state']
        self.assertEqual((state['value'], state['updatedBy'], state['mesh']),
                         ({'ok': True, 'n': 3}, 'alice', 'team'))
        entries = self.bob.call('state.list')['entries']
        self.assertEqual([(e['key'], e['mesh']) for e in entries], [('build', 'team')])
        self.assert_error('state_not_found', self.bob.call, 'state.get', {'key': 'nothing'})
        self.assert_error('invalid_params', self.bob.call, 'state.set', {'key': 'k'})

    # -- memory --------------------------------------------------------------------------

    def test_remember_recall_forget(self):
        stored = self.alice.call('memory.remember', {
            'content': 'The staging database lives on db-7', 'tags': ['infra']})
        self.assertEqual(stored['mesh'], 'team')
        self.assertTrue(stored['id'])
        matches = self.bob.call('memory.recall', {'query': 'staging DB-7'})['matches']
        self.assertEqual([m['id'] for m in matches], [stored['id']])
        self.assertEqual((matches[0]['rememberedBy'], matches[0]['tags']), ('alice', ['infra']))
        self.assertEqual(self.alice.call('memory.forget', {'id': stored['id']}),
                         {'ok': True, 'id': stored['id'], 'mesh': 'team'})
        wait_for(lambda: self.bob.call('memory.recall', {'query': 'staging'})['matches'] == [],
                 what='the memory forgotten')

    # -- skills --------------------------------------------------------------------------

    def test_a_published_skill_is_listed_and_fetched_by_the_other(self):
        self.alice.call('skills.publish', {
            'name': 'deploy', 'description': 'How we deploy', 'tags': ['ops'],
            'instructions': '1. make deb\n2. apt install ./dist/*.deb'})
        skills = self.bob.call('skills.list')['skills']
        self.assertEqual([(s['name'], s['author'], s['mesh']) for s in skills],
                         [('deploy', 'alice', 'team')])
        self.assertEqual(self.bob.call('skills.list', {'query': 'OPS'})['skills'][0]['name'],
                         'deploy')
        skill = self.bob.call('skills.get', {'name': 'deploy'})['skill']
        self.assertIn('apt install', skill['instructions'])
        self.assertEqual(self.alice.call('skills.remove', {'name': 'deploy'})['removed'], True)
        self.assert_error('skill_not_found', self.bob.call, 'skills.get', {'name': 'deploy'})

    # -- presence ------------------------------------------------------------------------

    def roster_row(self, daemon, name):
        peers = daemon.call('peers.list')['peers']
        return next((p for p in peers if p.get('displayName') == name), None)

    def test_profile_summary_and_groups_come_back_after_a_daemon_restart(self):
        self.bob.call('profile.set', {'summary': 'reviewing PR 12', 'title': 'reviewer'})
        self.bob.call('groups.join', {'name': '@reviewers', 'role': 'lead'})
        self.bob.call('status.set', {'status': 'dnd'})

        def shows_all():
            row = self.roster_row(self.alice, 'bob')
            return row if (row and row.get('summary') == 'reviewing PR 12'
                           and row.get('profile', {}).get('title') == 'reviewer'
                           and {'name': 'reviewers', 'role': 'lead'} in row.get('groups', [])
                           and row.get('status') == 'dnd') else None
        wait_for(shows_all, what="bob's profile on alice's roster")
        self.bob.stop()
        wait_for(lambda: self.roster_row(self.alice, 'bob') is None,
                 what="bob's presence gone after its grace window")
        self.bob = self.daemon([self.bob_entry], home=self.bob.home, timings=self.daemon_timings)
        wait_for(shows_all, what="bob's profile after his daemon restarted")

    def test_a_session_acts_as_itself(self):
        token, pub = self.session(self.bob, self.bob_entry, 'bob-s1')
        client = self.attached(self.bob, token)
        result = client.call('summary.set', {'summary': 'on the parser'})
        self.assertEqual(result['meshes'], ['team'])
        wait_for(lambda: any(p.get('pubkey') == pub and p.get('summary') == 'on the parser'
                             for p in self.alice.call('peers.list')['peers']),
                 what="the session's summary on its own presence")
        member_row = next(p for p in self.alice.call('peers.list')['peers']
                          if p.get('pubkey') == self.bob_entry['pubkey'])
        self.assertNotEqual(member_row.get('summary'), 'on the parser')

    def test_a_status_change_is_a_peer_changed_event(self):
        self.alice.call('peers.list')       # the baseline roster
        wait_event = self.events_of(self.alice)
        self.bob.call('status.set', {'status': 'dnd'})
        # Nobody asks alice's daemon for a roster: its poll, while the stream is open, does.
        change = wait_event('peer_changed', lambda d: d['pubkey'] == self.bob_entry['pubkey'])
        self.assertEqual(change['changes']['status']['to'], 'dnd')
        self.assertEqual(change['display_name'], 'bob')

    def test_a_working_agent_holds_low_messages_until_it_is_idle_but_not_now_ones(self):
        token, pub = self.session(self.bob, self.bob_entry, 'bob-s1')
        client = self.attached(self.bob, token)
        self.assertTrue(client.call('agent.status', {'status': 'working'})['reported'])
        wait_for(lambda: any(p.get('pubkey') == pub and p.get('status') == 'working'
                             for p in self.alice.call('peers.list')['peers']),
                 what='the hook status on the roster')
        self.alice.call('send', {'to': pub, 'message': 'when you have a minute',
                                 'priority': 'low'})
        self.alice.call('send', {'to': pub, 'message': 'stop the build', 'priority': 'now'})
        first = self.wait_inbox(self.bob, 1, client)
        self.assertEqual([item['body'] for item in first], ['stop the build'])
        # The broker drains in order: the low one, sent first, was held back, not late.
        self.assertEqual(len(self.inbox(self.bob, client)), 1)
        client.call('agent.status', {'status': 'idle'})
        both = self.wait_inbox(self.bob, 2, client)
        self.assertEqual(sorted(item['body'] for item in both),
                         ['stop the build', 'when you have a minute'])

    # -- grants and message status -------------------------------------------------------

    def test_a_blocked_sender_s_dm_fails_once_and_its_broadcasts_follow_their_grant(self):
        blocked = self.bob.call('grants.block', {'peer': 'alice'})
        self.assertEqual((blocked['peer'], blocked['capabilities']),
                         (self.alice_entry['pubkey'], []))
        rows = self.bob.call('grants.list')['grants']
        self.assertEqual([(r['peer'], r['blocked']) for r in rows],
                         [(self.alice_entry['pubkey'], True)])
        sent = self.alice.call('send', {'to': self.bob_entry['pubkey'], 'message': 'hi bob'})
        dead = self.wait_outbox(self.alice, 'dead')[0]
        self.assertEqual(dead['client_message_id'], sent['client_message_id'])
        self.assertIn('blocked', dead['last_error'])
        self.assertLessEqual(dead['attempts'], 1)
        status = self.alice.call('message.status',
                                 {'client_message_id': sent['client_message_id']})
        self.assertEqual(status['delivery'], 'failed')
        # A broadcast needs `broadcast`, which bob's block also took away; allow it alone.
        self.bob.call('grants.set', {'peer': 'alice', 'capabilities': ['broadcast']})
        self.alice.call('send', {'to': '*', 'message': 'hello all'})
        self.wait_inbox(self.bob, 1)
        self.bob.call('grants.revoke', {'peer': 'alice'})
        self.assertEqual(self.bob.call('grants.list')['grants'], [])

    def test_message_status_goes_from_queued_to_delivered(self):
        self.bob.stop()
        sent = self.alice.call('send', {'to': self.bob_entry['pubkey'], 'message': 'later'})
        cmid = sent['client_message_id']
        wait_for(lambda: self.alice.call('message.status', {'client_message_id': cmid})[
            'delivery'] == 'queued', what='queued at the broker')
        self.bob = self.daemon([self.bob_entry], home=self.bob.home, timings=self.daemon_timings)
        self.wait_inbox(self.bob, 1)
        status = wait_for(lambda: (lambda s: s if s['delivery'] == 'delivered' else None)(
            self.alice.call('message.status', {'client_message_id': cmid})),
            what='delivered')
        self.assertTrue(status['delivered_at'])
        self.assert_error('not_found', self.alice.call, 'message.status',
                          {'client_message_id': 'no-such-id'})

    # -- failures ------------------------------------------------------------------------

    def test_moderation_needs_an_admin(self):
        self.assert_error('forbidden', self.alice.call, 'members.kick', {'target': 'bob'})
        self.assertEqual(self.alice.call('members.bans')['bans'], [])


class SharedDataSqliteTest(SharedDataMixin, LinksTestCase):
    backend = 'sqlite'


class SharedDataPostgresTest(SharedDataMixin, LinksTestCase):
    backend = 'postgresql'


if __name__ == '__main__':
    unittest.main()
