"""`meshd hook EVENT` end to end: a real broker, real daemons, the hook as a child process.

alice's daemon sends; bob's daemon holds the session `bob-session`, whose hooks the test runs
as Claude Code does (JSON on stdin, `meshd hook EVENT`). Every hook run is checked to exit 0;
the text it hands over is parsed line by line, and the inbox rows are checked to be marked
surfaced exactly as far as they were printed.
"""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid

from meshd import crypto
from tests.base import DEADLINE, ENTRY, short_tempdir, wait_for
from tests.claude_base import agent_env, hook_context, run_hook, token_file
from tests.links_base import LinksTestCase

# A stand-in for Claude Code: it starts the "MCP bridge" (a sleep whose pid the session is
# registered with), prints that pid, waits for `go`, then runs the hook through `sh -c` as its
# own child and prints the hook's (stdout, stderr, exit status) as JSON.
STAND_IN = r'''
import json, subprocess, sys
bridge = subprocess.Popen(['sleep', '600'])
try:
    print(bridge.pid, flush=True)
    if sys.stdin.readline().strip() == 'go':
        hook = subprocess.run(['sh', '-c', '"$0" "$1" hook SessionStart', sys.executable,
                               sys.argv[1]], input='{"hook_event_name": "SessionStart"}',
                              capture_output=True, text=True)
        print(json.dumps([hook.stdout, hook.stderr, hook.returncode]), flush=True)
finally:
    bridge.kill()
    bridge.wait()
'''


def handed_bodies(context):
    """The message bodies of a hook's text, in the order it lists them."""
    return [line.split('): ', 1)[1] for line in context.splitlines() if line.startswith('- ')]


class HookTestCase(LinksTestCase):
    """alice's daemon (the sender) and bob's daemon with `bob-session` and its token file."""

    receiver_timings = {}

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.sender = self.daemon([self.alice])
        self.receiver = self.daemon([self.bob], timings=self.receiver_timings)
        self.token, self.session_pub = self.register_session()
        tmp = short_tempdir()
        self.addCleanup(shutil.rmtree, tmp, True)
        self.env = agent_env(self.receiver.home,
                             MESHD_SESSION_TOKEN_FILE=token_file(self, tmp, self.token))
        self.client = self.attached(self.receiver, self.token)

    def register_session(self):
        return self.session(self.receiver, self.bob, 'bob-session')

    def send(self, texts, priority='now'):
        """DM each text to bob-session in turn; return all of its rows once they arrived."""
        before = len(self.rows())
        for text in texts:
            self.sender.call('send', {'to': self.session_pub, 'message': text,
                                      'priority': priority})
        self.wait_inbox(self.receiver, before + len(texts), client=self.client, limit=1000)
        return self.rows()

    def rows(self):
        """bob-session's inbox rows by body."""
        items = self.client.call('inbox.list', {'limit': 1000})['items']
        return {item['body']: item for item in items}

    def surfaced(self):
        """{body: surfaced_via} of bob-session's rows."""
        return {body: row['surfaced_via'] for body, row in self.rows().items()}

    def hook_output(self, event, env=None, **hook_input):
        """The stdout of one hook run, checked to exit 0 with nothing on stderr."""
        stdout, stderr, code, _seconds = run_hook(event, env or self.env, hook_input)
        self.assertEqual((code, stderr), (0, ''))
        return stdout

    def hook(self, event, **hook_input):
        """The text one hook run handed to the model ('' for none)."""
        stdout = self.hook_output(event, **hook_input)
        if event != 'Stop' and stdout:
            self.assertEqual(list(json.loads(stdout)['hookSpecificOutput']),
                             ['hookEventName', 'additionalContext'])
            self.assertEqual(json.loads(stdout)['hookSpecificOutput']['hookEventName'], event)
        return hook_context(stdout)


class HandOverTest(HookTestCase):

    def test_session_start_hands_over_the_oldest_ten_then_the_rest_then_nothing(self):
        texts = ['dm %02d' % number for number in range(15)]
        self.send(texts)
        first = self.hook('SessionStart')
        self.assertEqual(handed_bodies(first), texts[:10])
        self.assertTrue(first.startswith('meshd: 10 messages from the mesh for this session:'),
                        first)
        self.assertIn('\n5 more: run `meshd inbox`.\n', first)
        self.assertEqual(self.surfaced(), dict({t: 'hook' for t in texts[:10]},
                                               **{t: None for t in texts[10:]}))
        second = self.hook('SessionStart')
        self.assertEqual(handed_bodies(second), texts[10:])
        self.assertNotIn('more: run', second)
        self.assertEqual(self.surfaced(), {t: 'hook' for t in texts})
        self.assertEqual(self.hook_output('SessionStart'), '')

    def test_a_hand_over_stops_at_the_character_budget(self):
        texts = ['%d%s' % (number, 'x' * 3000) for number in range(4)]
        self.send(texts)
        context = self.hook('SessionStart')
        self.assertEqual(handed_bodies(context), texts[:2])    # 8000 characters at most
        self.assertIn('\n2 more: run `meshd inbox`.\n', context)
        self.assertEqual([self.surfaced()[t] for t in texts], ['hook', 'hook', None, None])

    def test_stop_continues_for_a_now_row_behind_a_backlog_of_ten(self):
        self.send(['backlog %02d' % number for number in range(10)], priority='next')
        self.send(['urgent behind the backlog'], priority='now')
        decision = json.loads(self.hook_output('Stop') or '{}')
        self.assertEqual(decision.get('decision'), 'block')
        self.assertIn('urgent behind the backlog', handed_bodies(decision['reason']))

    def test_post_tool_use_hands_over_only_what_arrived_since_the_last_hand_over(self):
        backlog = ['backlog %02d' % number for number in range(12)]
        self.send(backlog)
        self.assertEqual(handed_bodies(self.hook('SessionStart')), backlog[:10])
        self.send(['after the prompt'])
        self.assertEqual(handed_bodies(self.hook('PostToolUse')), ['after the prompt'])
        self.assertEqual(self.hook_output('PostToolUse'), '')
        surfaced = self.surfaced()
        self.assertEqual([surfaced[t] for t in backlog[10:]], [None, None])
        self.assertEqual(surfaced['after the prompt'], 'hook')

    def test_a_channel_turn_confirms_its_meshd_tags_and_ignores_other_sources(self):
        rows = self.send(['seen by channel', 'tagged by another source'])
        prompt = ('<channel source="meshd" inbox_id="%s" from_name="alice">seen</channel>\n'
                  '<channel source="other" inbox_id="%s">other</channel> what now?' % (
                      rows['seen by channel']['id'], rows['tagged by another source']['id']))
        context = self.hook('UserPromptSubmit', prompt=prompt)
        self.assertEqual(handed_bodies(context), ['tagged by another source'])
        self.assertEqual(self.surfaced(), {'seen by channel': 'channel',
                                           'tagged by another source': 'hook'})

    def test_stop_continues_only_for_a_now_row_and_never_while_stop_hook_active(self):
        self.send(['routine'], priority='next')
        self.assertEqual(self.hook_output('Stop'), '')
        self.assertEqual(self.surfaced(), {'routine': None})
        self.send(['urgent'], priority='now')
        self.assertEqual(self.hook_output('Stop', stop_hook_active=True), '')
        self.assertEqual(self.surfaced(), {'routine': None, 'urgent': None})
        decision = json.loads(self.hook_output('Stop'))
        self.assertEqual(sorted(decision), ['decision', 'reason'])
        self.assertEqual(decision['decision'], 'block')
        self.assertTrue(decision['reason'].startswith(
            'meshd: 2 messages from the mesh for this session (urgent):'), decision['reason'])
        # At Stop the urgent row comes first, then the others, oldest first.
        self.assertEqual(handed_bodies(decision['reason']), ['urgent', 'routine'])
        self.assertIn('[URGENT] ', decision['reason'])
        self.assertEqual(self.surfaced(), {'routine': 'hook', 'urgent': 'hook'})


class LongGraceTest(HookTestCase):

    receiver_timings = {'channel_grace': 30.0}

    def test_a_row_emitted_to_a_channel_is_held_back_within_the_grace(self):
        rows = self.send(['emitted', 'not emitted'])
        self.client.call('inbox.mark_emitted', {'ids': [rows['emitted']['id']]})
        self.assertEqual(handed_bodies(self.hook('SessionStart')), ['not emitted'])
        self.assertEqual(self.surfaced(), {'emitted': None, 'not emitted': 'hook'})
        self.assertEqual(self.hook_output('UserPromptSubmit', prompt='hi'), '')


class ShortGraceTest(HookTestCase):

    receiver_timings = {'channel_grace': 2.0}

    def test_a_row_emitted_but_never_confirmed_is_handed_over_after_the_grace(self):
        row = self.send(['emitted, never confirmed'])['emitted, never confirmed']
        self.client.call('inbox.mark_emitted', {'ids': [row['id']]})
        context = wait_for(lambda: self.hook('SessionStart'), what='the grace to end')
        self.assertEqual(handed_bodies(context), ['emitted, never confirmed'])
        row = self.rows()['emitted, never confirmed']
        self.assertIsNotNone(row['emitted_at'])
        self.assertEqual(row['surfaced_via'], 'hook')


class StatusTest(HookTestCase):
    """bob-session registered with its cwd, as the MCP bridge and `meshd launch` do."""

    def register_session(self):
        pub, sec = crypto.generate_keypair()
        wire = crypto.make_attestation(self.bob['pubkey'], self.bob['secretKey'], pub,
                                       int(time.time() * 1000) + 3600 * 1000)
        token = secrets.token_hex(32)
        self.receiver.call('sessions.register', {
            'token': token, 'session_id': str(uuid.uuid4()), 'mesh': 'team',
            'display_name': 'bob-session', 'pid': self.live_process().pid,
            'cwd': '/srv/bob-project', 'presence': {
                'session_pubkey': pub, 'session_secret_key': sec, 'parent_attestation': {
                    'session_pubkey': pub, 'parent_member_pubkey': self.bob['pubkey'],
                    'expires_at': wire['expiresAt'], 'signature': wire['signature']}}})
        wait_for(lambda: self.receiver.call('daemon.health')['sessions'].get(
            token[:8], {}).get('status') == 'open', what='the session link')
        return token, pub

    def peer_status(self):
        """bob-session's status as alice's daemon sees it in peers.list."""
        peers = self.sender.call('peers.list', {'mesh': 'team'})['peers']
        return next((p['status'] for p in peers if p['pubkey'] == self.session_pub), None)

    def assert_statuses_follow_the_hooks(self, timeout=DEADLINE):
        self.assertEqual(self.peer_status(), 'idle')
        self.hook('UserPromptSubmit', prompt='start working')
        wait_for(lambda: self.peer_status() == 'working', timeout, what='status working')
        self.hook('Stop')
        wait_for(lambda: self.peer_status() == 'idle', timeout, what='status idle')

    def test_user_prompt_submit_reports_working_and_stop_reports_idle(self):
        self.assert_statuses_follow_the_hooks()


class StatusWithoutCwdTest(StatusTest):
    """sessions.register takes `cwd` as optional; the presence then says the daemon's cwd."""

    def register_session(self):
        return HookTestCase.register_session(self)

    def test_user_prompt_submit_reports_working_and_stop_reports_idle(self):
        self.assert_statuses_follow_the_hooks()


class DaemonUnavailableTest(HookTestCase):

    def test_a_stopped_daemon_means_exit_zero_and_no_output(self):
        self.send(['never handed over'])
        self.receiver.stop()
        for event in ('SessionStart', 'UserPromptSubmit', 'PostToolUse', 'Stop'):
            stdout, stderr, code, _seconds = run_hook(event, self.env, {'prompt': 'x'})
            self.assertEqual((stdout, stderr, code), ('', '', 0), event)

    def test_a_frozen_daemon_is_given_up_at_the_real_one_second_deadline(self):
        self.send(['never handed over'])
        self.addCleanup(lambda: self.receiver.proc.poll() is None and os.kill(
            self.receiver.proc.pid, signal.SIGCONT))
        os.kill(self.receiver.proc.pid, signal.SIGSTOP)
        env = dict(self.env, MESHD_TEST_TIMINGS=json.dumps({'hook_deadline': 1.0}))
        stdout, stderr, code, seconds = run_hook('SessionStart', env)
        self.assertEqual((stdout, stderr, code), ('', '', 0))
        self.assertLess(seconds, 10.0)
        # What gave up was the deadline, not the client's own 5 s socket timeout.
        env['MESHD_HOOK_DEBUG'] = '1'
        stdout, stderr, code, seconds = run_hook('SessionStart', env)
        self.assertEqual((stdout, stderr, code),
                         ('', 'meshd hook: deadline of 1.0s passed\n', 0))
        self.assertLess(seconds, 10.0)


class HygieneTest(HookTestCase):

    def run_raw(self, args, stdin, env):
        result = subprocess.run([sys.executable, ENTRY] + args, input=stdin, env=env,
                                capture_output=True, text=True, timeout=DEADLINE)
        return result.stdout, result.stderr, result.returncode

    def test_bad_stdin_is_an_empty_input_and_an_unknown_event_does_nothing(self):
        self.send(['first', 'second'])
        stdout, stderr, code = self.run_raw(['hook', 'SessionStart'], 'not json {', self.env)
        self.assertEqual((stderr, code), ('', 0))
        self.assertEqual(handed_bodies(hook_context(stdout)), ['first', 'second'])
        self.send(['third'])
        stdout, stderr, code = self.run_raw(['hook', 'UserPromptSubmit'], '[1, 2]', self.env)
        self.assertEqual((stderr, code), ('', 0))
        self.assertEqual(handed_bodies(hook_context(stdout)), ['third'])
        self.send(['fourth'])
        for args in (['hook', 'NoSuchEvent'], ['hook']):
            self.assertEqual(self.run_raw(args, '{}', self.env), ('', '', 0), args)
        self.assertIsNone(self.surfaced()['fourth'])

    def test_diagnostics_go_to_stderr_only_with_meshd_hook_debug(self):
        home = short_tempdir()      # no daemon ever ran here
        self.addCleanup(shutil.rmtree, home, True)
        quiet = run_hook('SessionStart', agent_env(home))
        self.assertEqual(quiet[:3], ('', '', 0))
        stdout, stderr, code, _seconds = run_hook('SessionStart',
                                                  agent_env(home, MESHD_HOOK_DEBUG='1'))
        self.assertEqual((stdout, code), ('', 0))
        self.assertTrue(stderr.startswith('meshd hook: no daemon socket at '), stderr)
        self.assertNotIn('Traceback', stderr)


class ProcessTreeTest(LinksTestCase):
    """Without a token file the hook finds the session of the Claude Code process above it.
    bob's daemon holds one session only, the stand-in's: any session registered with a child
    of the test process would match every hook the test runs."""

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.sender = self.daemon([self.alice])
        self.receiver = self.daemon([self.bob])
        self.env = agent_env(self.receiver.home)

    def start_stand_in(self):
        proc = subprocess.Popen([sys.executable, '-c', STAND_IN, ENTRY], env=self.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def end():
            if proc.poll() is None:
                proc.communicate('', timeout=DEADLINE)   # EOF: it ends its bridge and exits
        self.addCleanup(end)
        return proc, int(proc.stdout.readline())

    def test_the_hook_finds_the_session_whose_process_is_a_child_of_its_ancestor(self):
        stand_in, bridge_pid = self.start_stand_in()
        token, session_pub = self.session(self.receiver, self.bob, 'bob-claude', pid=bridge_pid)
        self.sender.call('send', {'to': session_pub, 'message': 'found you', 'priority': 'now'})
        client = self.attached(self.receiver, token)
        self.wait_inbox(self.receiver, 1, client=client)
        # Run by the test, not under the stand-in: no session is above this hook.
        stdout, stderr, code, _seconds = run_hook('SessionStart',
                                                  dict(self.env, MESHD_HOOK_DEBUG='1'))
        self.assertEqual((stdout, code), ('', 0))
        self.assertIn('no session for this hook', stderr)
        self.assertIsNone(self.inbox(self.receiver, client)[0]['surfaced_at'])
        output, _ = stand_in.communicate('go\n', timeout=DEADLINE)
        stdout, stderr, code = json.loads(output)
        self.assertEqual((stderr, code), ('', 0))
        self.assertEqual(handed_bodies(hook_context(stdout)), ['found you'])
        self.assertEqual(self.inbox(self.receiver, client)[0]['surfaced_via'], 'hook')
