"""Shared data in `meshd mcp`: the presence, memory and state tools, the mesh's skills as
prompts and resources, and shared-data events as channel lines.

The end-to-end tests drive `meshd mcp` as Claude Code does (a child process on pipes) for
bob's session on bob's daemon, with a real broker and alice's daemon as the other member.
The unit tests check the rendering, the tools' text and the MCP methods with stand-ins.
"""
import shutil

from rpc.client import RpcCallError, RpcConnectionError
from rpc.protocol import INVALID_PARAMS, RpcError

from meshd.claude import render
from meshd.claude.bridge import Bridge, Identity
from meshd.claude.mcp import McpServer, skill_name, skill_uri
from meshd.claude.shared_tools import SharedTools
from meshd.claude.tools import Tools
from tests.base import MeshdTestCase, short_tempdir, wait_for
from tests.claude_base import McpClient, agent_env, token_file
from tests.links_base import LinksTestCase

SHARED_TOOLS = ['set_status', 'set_summary', 'remember', 'recall', 'state']
SKILL = {'name': 'deploy-checklist', 'description': 'How this team deploys',
         'instructions': '# Deploy\n\n1. Run the tests.\n2. Tag the release.\n',
         'tags': ['ops']}


class SharedTestCase(LinksTestCase):

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.da = self.daemon([self.alice])
        self.db = self.daemon([self.bob], timings={'roster_poll_interval': 0.5})
        self.token, self.session_pub = self.session(self.db, self.bob, 'bob-session')
        tmp = short_tempdir()
        self.addCleanup(shutil.rmtree, tmp, True)
        self.client = McpClient(self, agent_env(
            self.db.home, MESHD_SESSION_TOKEN_FILE=token_file(self, tmp, self.token)))
        self.client.handshake()

    def text(self, name, arguments=None):
        """The text of a tool call that must succeed."""
        result = self.client.tool(name, arguments)
        self.assertFalse(result.get('isError'), result)
        return result['content'][0]['text']

    def failure(self, name, arguments=None):
        """The one line of a tool call that must fail."""
        result = self.client.tool(name, arguments)
        self.assertTrue(result.get('isError'), result)
        text = result['content'][0]['text']
        self.assertEqual(len(text.splitlines()), 1, text)
        return text

    def system_lines(self, event):
        return [n['content'] for n in self.client.channel('system')
                if n['meta'].get('event') == event]

    def wait_system_line(self, event, fragment):
        return wait_for(lambda: [line for line in self.system_lines(event) if fragment in line],
                        what='a %s line with %r' % (event, fragment))


class SharedToolsTest(SharedTestCase):

    def test_tools_list_has_the_shared_tools_after_the_message_tools(self):
        tools = self.client.call('tools/list')['tools']
        names = [tool['name'] for tool in tools]
        self.assertEqual(names[:4], ['send_message', 'list_peers', 'read_inbox', 'mesh_status'])
        self.assertEqual(names[4:], SHARED_TOOLS)
        for tool in tools:
            self.assertTrue(tool['description'])
            self.assertEqual(tool['inputSchema']['type'], 'object')

    def test_remember_then_recall(self):
        stored = self.text('remember', {'content': 'the staging password is in vault 7',
                                        'tags': ['ops', 'staging']})
        self.assertIn('remembered on mesh team', stored)
        found = self.text('recall', {'query': 'vault'})
        self.assertIn('1 memory matches "vault"', found)
        self.assertIn('the staging password is in vault 7', found)
        self.assertIn('tags: ops, staging', found)
        # Shared: alice's daemon finds it too.
        matches = self.da.call('memory.recall', {'query': 'staging'})['matches']
        self.assertEqual([m['content'] for m in matches], ['the staging password is in vault 7'])
        self.assertIn('no memories match', self.text('recall', {'query': 'kubernetes'}))
        self.failure('remember', {'content': ''})
        self.failure('recall', {})

    def test_state_set_get_and_list(self):
        self.assertIn('state build_status = "green" on mesh team',
                      self.text('state', {'action': 'set', 'key': 'build_status',
                                          'value': 'green'}))
        self.text('state', {'action': 'set', 'key': 'owners', 'value': {'auth': 'bob'}})
        got = self.text('state', {'action': 'get', 'key': 'build_status'})
        self.assertTrue(got.startswith('state build_status = "green" (set by '), got)
        listed = self.text('state', {'action': 'list'})
        self.assertIn('- build_status = "green"', listed)
        self.assertIn('- owners = {"auth": "bob"}', listed)
        # Shared: alice's daemon reads the same value.
        self.assertEqual(self.da.call('state.get', {'key': 'owners'})['state']['value'],
                         {'auth': 'bob'})
        self.assertIn('is not set', self.text('state', {'action': 'get', 'key': 'nothing'}))
        self.failure('state', {'action': 'set', 'key': 'no_value'})
        self.failure('state', {'action': 'get'})
        self.failure('state', {'action': 'delete', 'key': 'x'})

    def test_set_status_and_summary_show_in_the_other_members_roster(self):
        self.assertIn('status set to dnd on mesh team',
                      self.text('set_status', {'status': 'dnd'}))
        self.assertIn('summary set on mesh team: "reviewing PR 12"',
                      self.text('set_summary', {'summary': 'reviewing PR 12'}))

        def bob_in_alices_roster():
            peers = self.da.call('peers.list', {})['peers']
            bob = [p for p in peers if p.get('displayName') == 'bob-session']
            if bob and bob[0].get('status') == 'dnd' and \
                    bob[0].get('summary') == 'reviewing PR 12':
                return bob[0]
            return None
        wait_for(bob_in_alices_roster, what='bob-session dnd with its summary in alice\'s roster')
        self.failure('set_status', {'status': 'asleep'})


class SkillsTest(SharedTestCase):

    def test_a_skill_published_elsewhere_is_a_prompt_and_a_resource(self):
        self.assertEqual(self.client.call('prompts/list'), {'prompts': []})
        self.da.call('skills.publish', SKILL)
        prompts = wait_for(lambda: self.client.call('prompts/list')['prompts'],
                           what='the skill in prompts/list')
        self.assertEqual([p['name'] for p in prompts], ['deploy-checklist'])
        self.assertIn('How this team deploys', prompts[0]['description'])
        prompt = self.client.call('prompts/get', {'name': 'deploy-checklist'})
        self.assertIn('How this team deploys', prompt['description'])
        self.assertEqual(prompt['messages'], [{'role': 'user', 'content': {
            'type': 'text', 'text': SKILL['instructions']}}])

        resources = self.client.call('resources/list')['resources']
        self.assertEqual(resources, [{'uri': 'skill://meshd/deploy-checklist',
                                      'name': 'deploy-checklist', 'mimeType': 'text/markdown',
                                      'description': prompts[0]['description']}])
        read = self.client.call('resources/read', {'uri': 'skill://meshd/deploy-checklist'})
        self.assertEqual(read, {'contents': [{'uri': 'skill://meshd/deploy-checklist',
                                              'mimeType': 'text/markdown',
                                              'text': SKILL['instructions']}]})
        templates = self.client.call('resources/templates/list')['resourceTemplates']
        self.assertEqual([t['uriTemplate'] for t in templates], ['skill://meshd/{name}'])

        unknown = self.client.request('prompts/get', {'name': 'no-such-skill'})['error']
        self.assertEqual(unknown['code'], INVALID_PARAMS)
        self.assertIn('no-such-skill', unknown['message'])
        for uri in ('skill://meshd/no-such-skill', 'file:///etc/passwd'):
            missing = self.client.request('resources/read', {'uri': uri})['error']
            self.assertEqual(missing['code'], INVALID_PARAMS)
            self.assertIn('resource not found: %s' % uri, missing['message'])
            self.assertEqual(missing['data']['uri'], uri)

    def test_without_a_broker_lists_are_empty_and_a_get_says_why(self):
        self.da.call('skills.publish', SKILL)
        wait_for(lambda: self.client.call('prompts/list')['prompts'], what='the skill')
        self.broker.stop()
        wait_for(lambda: self.db.call('daemon.health')['brokers']['team']['status'] != 'open',
                 what='bob\'s link to close')
        self.assertEqual(self.client.call('prompts/list'), {'prompts': []})
        self.assertEqual(self.client.call('resources/list'), {'resources': []})
        error = self.client.request('prompts/get', {'name': 'deploy-checklist'})['error']
        self.assertNotEqual(error['code'], INVALID_PARAMS)
        self.assertIn('cannot be read now', error['message'])
        error = self.client.request('resources/read',
                                    {'uri': 'skill://meshd/deploy-checklist'})['error']
        self.assertIn('cannot be read now', error['message'])


class SharedEventsTest(SharedTestCase):

    def test_another_members_state_change_is_a_channel_line_and_our_own_is_not(self):
        self.client.wait_channel(1, kind='welcome')
        self.text('state', {'action': 'set', 'key': 'mine', 'value': 1})
        # Once alice reads it the broker has fanned it out, before alice's changes below.
        wait_for(lambda: self.da.call('state.get', {'key': 'mine'})['state']['value'] == 1,
                 what='bob\'s value at the broker')
        self.da.call('state.set', {'key': 'build_status', 'value': 'green'})
        self.da.call('state.set', {'key': 'build_status', 'value': 'green'})   # no news
        self.da.call('state.set', {'key': 'build_status', 'value': 'red'})
        self.wait_system_line('state_change', '"red"')
        self.assertEqual(self.system_lines('state_change'),
                         ['[team] state build_status = "green" (by alice)',
                          '[team] state build_status = "red" (by alice)'])
        note = self.client.channel('system')[-1]
        self.assertEqual(note['meta'], {'kind': 'system', 'event': 'state_change',
                                        'mesh_slug': 'team', 'state_key': 'build_status',
                                        'updated_by': 'alice'})

    def test_a_peers_summary_and_dnd_are_channel_lines_its_working_status_is_not(self):
        self.client.wait_channel(1, kind='welcome')
        self.text('set_summary', {'summary': 'my own summary'})
        token, _pub = self.session(self.da, self.alice, 'alice-session')
        alice = self.attached(self.da, token)
        # bob's daemon knows alice-session before it changes (a new peer is no change).
        wait_for(lambda: [p for p in self.db.call('peers.list', {})['peers']
                          if p.get('displayName') == 'alice-session'], what='alice-session')
        alice.call('status.set', {'status': 'working'})
        alice.call('summary.set', {'summary': 'fixing the login tests'})

        def line(fragment):
            lines = [text for text in self.system_lines('peer_changed') if fragment in text]
            if not lines:
                self.db.call('peers.list', {})    # a roster read on demand
            return lines
        wait_for(lambda: line('summary "fixing the login tests"'), what='alice\'s summary')
        alice.call('status.set', {'status': 'dnd'})
        wait_for(lambda: line('is now dnd'), what='alice\'s dnd')
        alice.call('status.set', {'status': 'idle'})
        wait_for(lambda: line('no longer dnd'), what='alice\'s dnd to end')
        self.da.call('state.set', {'key': 'marker', 'value': True})
        self.wait_system_line('state_change', 'marker')
        self.assertEqual(self.system_lines('peer_changed'), [
            '[team] alice-session: summary "fixing the login tests"',
            '[team] alice-session is now dnd (do not disturb)',
            '[team] alice-session is no longer dnd: now idle'])


class RenderTest(MeshdTestCase):

    def test_a_state_change_is_one_line_with_string_meta(self):
        content, meta = render.system_notification('state_change', {
            'mesh': 'team', 'key': 'build_status', 'value': 'green', 'updated_by': 'alice'})
        self.assertEqual(content, '[team] state build_status = "green" (by alice)')
        self.assertEqual(meta, {'kind': 'system', 'event': 'state_change', 'mesh_slug': 'team',
                                'state_key': 'build_status', 'updated_by': 'alice'})
        content, meta = render.system_notification('state_change', {
            'mesh': 'team', 'key': 'plan', 'value': {'step': 2, 'note': 'a\nb'}})
        self.assertEqual(content, '[team] state plan = {"note": "a\\nb", "step": 2}')
        self.assertNotIn('updated_by', meta)
        long_value = render.system_notification('state_change', {
            'mesh': 'team', 'key': 'log', 'value': 'x' * 1000})[0]
        self.assertLess(len(long_value), 260)
        self.assertIsNone(render.system_notification('state_change', {'mesh': 'team'}))

    def test_a_peers_summary_and_dnd_are_lines_and_other_changes_are_not(self):
        def peer_changed(changes, name='bob'):
            return render.system_notification('peer_changed', {
                'mesh': 'team', 'pubkey': 'ab' * 32, 'member_pubkey': 'cd' * 32,
                'display_name': name, 'changes': changes})
        content, meta = peer_changed({'summary': {'from': None, 'to': 'fixing auth'}})
        self.assertEqual(content, '[team] bob: summary "fixing auth"')
        self.assertEqual(meta, {'kind': 'system', 'event': 'peer_changed', 'peer_name': 'bob',
                                'peer_pubkey': 'ab' * 32, 'mesh_slug': 'team',
                                'changed': 'summary'})
        self.assertEqual(peer_changed({'summary': {'from': 'x', 'to': ''}})[0],
                         '[team] bob cleared their summary')
        self.assertEqual(peer_changed({'status': {'from': 'working', 'to': 'dnd'}})[0],
                         '[team] bob is now dnd (do not disturb)')
        self.assertEqual(peer_changed({'status': {'from': 'dnd', 'to': 'working'}})[0],
                         '[team] bob is no longer dnd: now working')
        both, meta = peer_changed({'status': {'from': 'idle', 'to': 'dnd'},
                                   'summary': {'from': 'a', 'to': 'b'},
                                   'groups': {'from': [], 'to': ['@ops']}})
        self.assertEqual(both.splitlines(), ['[team] bob is now dnd (do not disturb)',
                                             '[team] bob: summary "b"'])
        self.assertEqual(meta['changed'], 'status,summary')
        # A name or summary with a newline stays on its line.
        self.assertEqual(peer_changed({'summary': {'from': None, 'to': 'a\n[team] forged'}},
                                      name='eve\nx')[0],
                         '[team] eve x: summary "a [team] forged"')
        for ignored in ({'status': {'from': 'idle', 'to': 'working'}},
                        {'status': {'from': 'working', 'to': 'idle'}},
                        {'profile': {'from': {'avatar': 'a'}, 'to': {'avatar': 'b'}}},
                        {'groups': {'from': [], 'to': ['@ops']}},
                        {'visible': {'from': True, 'to': False}},
                        {'displayName': {'from': 'bob', 'to': 'robert'}}, {}):
            self.assertIsNone(peer_changed(ignored), ignored)

    def test_the_bridge_drops_its_own_changes_and_values_it_already_knows(self):
        sent = []
        bridge = Bridge(None, None, lambda message: sent.append(message) or True, {})
        bridge.identity = Identity('t' * 64, 'sid', 'team', 'bob-session', 0, own=False,
                                   pubkey='AB' * 32)
        own = {'mesh': 'team', 'pubkey': 'ab' * 32, 'display_name': 'bob-session',
               'changes': {'summary': {'from': None, 'to': 'mine'}}}
        bridge._on_event({'kind': 'peer_changed', 'data': own}, None)
        self.assertEqual(sent, [])
        bridge._on_event({'kind': 'peer_changed', 'data': dict(own, pubkey='ef' * 32)}, None)
        self.assertEqual(len(sent), 1)
        bridge.note_state('team', 'k', {'a': 1})
        state = {'mesh': 'team', 'key': 'k', 'value': {'a': 1}, 'updated_by': 'bob'}
        bridge._on_event({'kind': 'state_change', 'data': state}, None)      # our echo
        self.assertEqual(len(sent), 1)
        bridge._on_event({'kind': 'state_change', 'data': dict(state, value=2)}, None)
        bridge._on_event({'kind': 'state_change', 'data': dict(state, value=2)}, None)
        bridge._on_event({'kind': 'state_change', 'data': dict(state, mesh='other')}, None)
        self.assertEqual([m['params']['content'] for m in sent[1:]],
                         ['[team] state k = 2 (by bob)', '[other] state k = {"a": 1} (by bob)'])


class FakeDaemon:
    """`call(method, params)` answering from `answers` (a result, or an exception to raise);
    `calls` records what was asked."""

    def __init__(self, answers, mesh=None):
        self.answers = answers
        self.mesh = mesh
        self.calls = []

    def call(self, method, params=None):
        self.calls.append((method, params))
        answer = self.answers[method]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def read_mesh(self):
        return self.mesh


def _daemon_error(slug, code=-32005, message='the broker did not answer'):
    return RpcCallError({'code': code, 'message': message, 'data': {'code': slug}})


class UnitToolsAndSkillsTest(MeshdTestCase):

    def tools(self, answers):
        daemon = FakeDaemon(answers)
        return daemon, Tools(daemon.call, lambda: None, more=[SharedTools(daemon.call)])

    def test_tool_text_and_failures(self):
        daemon, tools = self.tools({
            'status.set': {'ok': True, 'status': 'working', 'meshes': ['team', 'ops']},
            'summary.set': {'ok': True, 'summary': '', 'meshes': ['team']},
            'memory.recall': {'matches': [], 'unreachable': ['ops']},
            'state.get': _daemon_error('state_not_found', -32002, 'no such key'),
            'state.list': _daemon_error('broker_timeout', message='the broker did not answer '
                                                                  'within 5 s')})
        text = tools.run('set_status', {'status': 'working'})['content'][0]['text']
        self.assertEqual(text, 'status set to working on meshes team, ops')
        self.assertEqual(tools.run('set_summary', {'summary': '  '})['content'][0]['text'],
                         'summary cleared on mesh team')
        self.assertEqual(tools.run('recall', {'query': 'x'})['content'][0]['text'],
                         'no memories match "x"\nbroker unreachable for: ops')
        missing = tools.run('state', {'action': 'get', 'key': 'k'})
        self.assertNotIn('isError', missing)
        self.assertEqual(missing['content'][0]['text'], 'state k is not set')
        failed = tools.run('state', {'action': 'list'})
        self.assertEqual(failed, {'isError': True, 'content': [
            {'type': 'text', 'text': 'the broker did not answer within 5 s'}]})
        self.assertTrue(tools.run('set_status', {'status': 'busy'})['isError'])
        self.assertEqual([m for m, _p in daemon.calls],
                         ['status.set', 'summary.set', 'memory.recall', 'state.get',
                          'state.list'])
        daemon.answers['state.set'] = RpcConnectionError('no socket')
        self.assertIn('not reachable', tools.run('state', {
            'action': 'set', 'key': 'k', 'value': None})['content'][0]['text'])
        self.assertEqual(daemon.calls[-1], ('state.set', {'key': 'k', 'value': None}))

    def test_skills_when_the_daemon_cannot_answer(self):
        for failure in (_daemon_error('broker_unreachable'), _daemon_error('broker_timeout'),
                        RpcConnectionError('no socket')):
            daemon = FakeDaemon({'skills.list': failure, 'skills.get': failure}, mesh='team')
            server = McpServer(daemon, None, None)
            with self.assertLogs('meshd.claude.mcp', 'WARNING'):
                self.assertEqual(server.prompts_list(None), {'prompts': []})
                self.assertEqual(server.resources_list(None), {'resources': []})
            self.assertEqual(daemon.calls[0], ('skills.list', {'mesh': 'team'}))
            for get in (lambda: server.prompts_get(None, name='deploy'),
                        lambda: server.resources_read(None, uri='skill://meshd/deploy')):
                with self.assertRaises(RpcError) as caught:
                    get()
                self.assertNotEqual(caught.exception.code, INVALID_PARAMS)
                self.assertEqual(len(caught.exception.message.splitlines()), 1)

    def test_skills_of_several_meshes_are_listed_once_per_name(self):
        daemon = FakeDaemon({'skills.list': {'skills': [
            {'name': 'a', 'description': 'first', 'author': 'alice', 'mesh': 'ops'},
            {'name': 'a', 'description': 'second', 'author': 'bob', 'mesh': 'team'},
            {'name': 'b w/ space', 'description': '', 'mesh': 'team'}],
            'unreachable': ['other']}})
        server = McpServer(daemon, None, None)
        self.assertEqual(server.prompts_list(None)['prompts'], [
            {'name': 'a', 'description': 'first (by alice, mesh ops)'},
            {'name': 'b w/ space', 'description': 'a skill shared on the mesh (mesh team)'}])
        self.assertEqual(daemon.calls[0], ('skills.list', {}))
        uri = skill_uri('b w/ space')
        self.assertEqual(uri, 'skill://meshd/b%20w%2F%20space')
        self.assertEqual(skill_name(uri), 'b w/ space')
        self.assertIsNone(skill_name('skill://meshd/'))
        self.assertIsNone(skill_name('skill://other/a'))
