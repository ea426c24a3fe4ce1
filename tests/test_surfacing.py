"""Delivery you can see (spec/agents.md §1): emitted and surfaced rows, the not_surfaced
warning, daemon.health's `mcp`, and the checks of the last-hop methods."""
import shutil

import gevent
from rpc.client import RpcCallError

from tests.base import short_tempdir, wait_for
from tests.claude_base import token_file
from tests.links_base import DAEMON_TIMINGS, LinksTestCase


class SurfacingTest(LinksTestCase):

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.da = self.daemon([self.alice])
        home = short_tempdir()
        self.addCleanup(shutil.rmtree, home, True)
        # A row nobody surfaces for 3 s raises the warning (production: 10 minutes).
        self.write_config([self.bob], home=home, not_surfaced_after=3)
        self.db = self.start_daemon(home=home, timings=dict(
            DAEMON_TIMINGS, surface_check_interval=0.2))
        self.wait_link(self.db, 'team')
        self.token, self.pub = self.session(self.db, self.bob, 'bob-session')
        self.client = self.attached(self.db, self.token)

    def dm(self, text):
        self.da.call('send', {'to': self.pub, 'message': text})

    def events(self, token=None):
        """Events of the daemon as they arrive (a subscriber read by a greenlet)."""
        client = self.db.client()
        self.addCleanup(client.close)
        if token:
            client.call('session.attach', {'token': token})
        client.call('events.subscribe')
        seen = []
        reader = gevent.spawn(lambda: seen.extend(
            m['params'] for m in client.notifications(timeout=None) if m.get('method') == 'event'))
        self.addCleanup(reader.kill)
        return seen

    def test_a_row_nobody_surfaces_raises_one_not_surfaced_warning(self):
        events = self.events(self.token)
        self.dm('unheard')
        row = self.wait_inbox(self.db, 1, client=self.client)[0]
        self.assertEqual((row['emitted_at'], row['surfaced_at'], row['surfaced_via']),
                         (None, None, None))
        warning = wait_for(lambda: _warnings(events, 1), what='the warning')[0]
        data = warning['data']
        self.assertEqual((data['event'], data['ids'], data['token_prefix'], data['count']),
                         ('not_surfaced', [row['id']], self.token[:8], 1))
        self.assertFalse(data['mcp_attached'])
        self.dm('second')
        self.wait_inbox(self.db, 2, client=self.client)
        second = wait_for(lambda: _warnings(events, 2), what='a second warning')[1]
        self.assertEqual(second['data']['count'], 1)     # the first row is not warned again

    def test_a_surfaced_row_raises_no_warning_and_keeps_its_first_surfacing(self):
        self.dm('heard')
        row = self.wait_inbox(self.db, 1, client=self.client)[0]
        self.assertEqual(self.client.call('inbox.mark_surfaced',
                                          {'ids': [row['id']], 'via': 'tool'}), {'marked': 1})
        self.assertEqual(self.client.call('inbox.mark_surfaced',
                                          {'ids': [row['id']], 'via': 'hook'}), {'marked': 0})
        events = self.events()
        self.dm('marker')       # a later row that is warned about proves the watch ran
        marker = wait_for(lambda: _warnings(events, 1), what='the marker warning')[0]
        listed = {r['body']: r for r in self.client.call('inbox.list', {})['items']}
        self.assertEqual(marker['data']['ids'], [listed['marker']['id']])
        self.assertEqual(listed['heard']['surfaced_via'], 'tool')

    def test_emits_show_in_health_and_in_the_row(self):
        self.dm('emitted')
        row = self.wait_inbox(self.db, 1, client=self.client)[0]
        health = self.db.call('daemon.health')['sessions'][self.token[:8]]['mcp']
        self.assertEqual(health, {'attached': False, 'last_emit_at': None})
        self.assertEqual(self.client.call('inbox.mark_emitted', {'ids': [row['id']]}),
                         {'marked': 1})
        row = self.client.call('inbox.list', {})['items'][0]
        self.assertIsNotNone(row['emitted_at'])
        self.assertIsNone(row['surfaced_at'])
        health = self.db.call('daemon.health')['sessions'][self.token[:8]]['mcp']
        self.assertIsNotNone(health['last_emit_at'])
        stream = self.db.client()
        self.addCleanup(stream.close)
        stream.call('session.attach', {'token': self.token})
        stream.call('events.subscribe', {'client': 'mcp'})
        self.assertTrue(self.db.call('daemon.health')['sessions'][self.token[:8]]['mcp'][
            'attached'])
        stream.close()
        wait_for(lambda: not self.db.call('daemon.health')['sessions'][self.token[:8]]['mcp'][
            'attached'], what='the stream to end')

    def test_meshd_inbox_shows_how_rows_reached_the_agent_and_marks_what_it_shows(self):
        self.dm('by tool')
        row = self.wait_inbox(self.db, 1, client=self.client)[0]
        self.client.call('inbox.mark_surfaced', {'ids': [row['id']], 'via': 'tool'})
        self.dm('not yet')
        self.wait_inbox(self.db, 2, client=self.client)
        shown = self.run_cli('inbox', home=self.db.home)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        lines = shown.stdout.splitlines()
        self.assertTrue(lines[lines.index('  by tool') + 1].startswith(
            '  reached the agent by MCP tool at '), shown.stdout)
        self.assertEqual(lines[lines.index('  not yet') + 1], '  not yet shown to an agent')
        rows = {r['body']: r for r in self.client.call('inbox.list', {})['items']}
        self.assertIsNone(rows['not yet']['surfaced_at'])      # shown to a person, not an agent
        tmp = short_tempdir()
        self.addCleanup(shutil.rmtree, tmp, True)
        token_path = token_file(self, tmp, self.token)
        as_session = self.run_cli('inbox', home=self.db.home,
                                  env={'MESHD_SESSION_TOKEN_FILE': token_path})
        self.assertEqual(as_session.returncode, 0, as_session.stderr)
        rows = {r['body']: r for r in self.client.call('inbox.list', {})['items']}
        self.assertEqual((rows['by tool']['surfaced_via'], rows['not yet']['surfaced_via']),
                         ('tool', 'cli'))

    def test_bad_parameters_get_stable_codes(self):
        for method, params, slug in (
                ('inbox.mark_surfaced', {'ids': ['x'], 'via': 'telepathy'}, 'invalid_params'),
                ('inbox.mark_emitted', {'ids': 'x'}, 'invalid_params'),
                ('agent.handover', {'event': 'Boot'}, 'invalid_params'),
                ('agent.status', {'status': 'asleep'}, 'invalid_params'),
                ('session.attach_by_pids', {'pids': []}, 'invalid_params'),
                ('session.attach_by_pids', {'pids': [True]}, 'invalid_params'),
                ('session.attach_by_pids', {'pids': [1]}, 'no_session')):
            with self.assertRaises(RpcCallError) as caught:
                self.client.call(method, params)
            self.assertEqual(caught.exception.slug, slug, method)
        with self.assertRaises(RpcCallError) as caught:
            self.db.call('agent.handover', {'event': 'Stop'})     # no session attached
        self.assertEqual(caught.exception.slug, 'no_session')

    def test_another_sessions_rows_cannot_be_marked(self):
        other_token, _other = self.session(self.db, self.bob, 'other')
        self.dm('for bob-session')
        row = self.wait_inbox(self.db, 1, client=self.client)[0]
        other = self.attached(self.db, other_token)
        self.assertEqual(other.call('inbox.mark_surfaced', {'ids': [row['id']], 'via': 'hook'}),
                         {'marked': 0})
        self.assertEqual(other.call('inbox.mark_emitted', {'ids': [row['id']]}), {'marked': 0})
        self.assertIsNone(self.client.call('inbox.list', {})['items'][0]['surfaced_at'])


def _warnings(events, count):
    found = [event for event in events if event['kind'] == 'warning']
    return found if len(found) >= count else None
