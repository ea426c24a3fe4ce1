"""`meshd launch` with Claude Code as the child: the session flags meshd adds to its argv.

End to end, a fake `claude` (a Python script first on PATH) records its argv, its token
file's mode and the session id the daemon reports to it (`meshd call sessions.me`) in a
JSON file; the CLI runs against a real broker and daemon with a temporary HOME, so
~/.claude/projects (where `--continue` looks for transcripts) is the test's own. The pure
helpers of meshd/launch.py (is_claude, claude_arguments, latest_session) are tested alone.
"""
import json
import os
import re
import shutil
import sys
import unittest
import uuid

from meshd import keystore
from meshd.launch import CHANNELS_FLAG, claude_arguments, is_claude, latest_session
from meshd.paths import Paths
from tests.base import ENTRY, ROOT, short_tempdir
from tests.links_base import LinksTestCase

CHANNELS = [CHANNELS_FLAG, 'server:meshd']

FAKE_AGENT = '''#!%(python)s
import json, os, stat, subprocess, sys
path = os.environ.get('MESHD_SESSION_TOKEN_FILE')
record = {'argv': sys.argv[1:], 'mode': None, 'exposed': None, 'session_id': None}
if path:
    token = open(path).read()
    record['mode'] = stat.S_IMODE(os.stat(path).st_mode)
    record['exposed'] = token in json.dumps([sys.argv, dict(os.environ)])
    me = subprocess.run([sys.executable, %(entry)r, 'call', 'sessions.me'],
                        capture_output=True, text=True, check=True).stdout
    record['session_id'] = json.loads(me)['session']['session_id']
with open(os.environ['FAKE_AGENT_RECORD'], 'w') as handle:
    json.dump(record, handle)
'''


def mangled(cwd):
    """The ~/.claude/projects folder name Claude Code gives the directory `cwd`."""
    return re.sub(r'[^a-zA-Z0-9]', '-', cwd)


def touch(path, mtime):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as handle:
        handle.write('{}\n')
    os.utime(path, (mtime, mtime))
    return path


class LaunchClaudeTest(LinksTestCase):
    """`meshd launch -- claude …` against a real daemon, with a fake `claude`."""

    def setUp(self):
        super().setUp()
        self.da = self.daemon([self.member('alice')], home=self.home)
        self.bin = short_tempdir()
        self.user_home = short_tempdir()
        for directory in (self.bin, self.user_home):
            self.addCleanup(shutil.rmtree, directory, True)
        for name in ('claude', 'not-claude'):
            path = os.path.join(self.bin, name)
            with open(path, 'w') as handle:
                handle.write(FAKE_AGENT % {'python': sys.executable, 'entry': ENTRY})
            os.chmod(path, 0o755)
        # run_cli runs in ROOT: Claude Code would keep this directory's transcripts here.
        self.projects = os.path.join(self.user_home, '.claude', 'projects',
                                     mangled(os.path.realpath(ROOT)))
        self.runs = 0

    def launch(self, *args):
        """Run `meshd launch ARGS` with the fakes first on PATH; (CompletedProcess, record)."""
        self.runs += 1
        record_path = os.path.join(self.bin, 'record-%d.json' % self.runs)
        result = self.run_cli('launch', *args, env={
            'PATH': self.bin + os.pathsep + os.environ.get('PATH', ''),
            'HOME': self.user_home, 'FAKE_AGENT_RECORD': record_path})
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(record_path) as handle:
            record = json.load(handle)
        self.assertEqual(record['mode'], 0o600, 'the token file must be 0600')
        self.assertIs(record['exposed'], False, 'the token leaked into argv or environment')
        self.assertEqual(self.da.call('sessions.list')['sessions'], [],
                         'the session outlived the child')
        return result, record

    def assertFreshSession(self, record, rest=()):
        """A new session: `--session-id <the daemon's id>`, the channels flag, then `rest`."""
        session_id = record['session_id']
        self.assertEqual(str(uuid.UUID(session_id)), session_id)
        self.assertEqual(record['argv'], ['--session-id', session_id] + CHANNELS + list(rest))

    def test_new_session_passes_the_registered_session_id(self):
        _result, record = self.launch('--', 'claude', '--model', 'x')
        self.assertFreshSession(record, ['--model', 'x'])
        # The keypair of that session id is kept, so `--resume`/`--continue` can revive it.
        self.assertTrue(os.path.exists(Paths(self.home).session_keypair(
            'team', record['session_id'])))

    def test_resume_passes_resume_and_registers_that_id(self):
        session_id = str(uuid.uuid4())
        _result, record = self.launch('--resume', session_id, '--', 'claude')
        self.assertEqual(record['argv'], ['--resume', session_id] + CHANNELS)
        self.assertNotIn('--session-id', record['argv'])
        self.assertEqual(record['session_id'], session_id)

    def test_no_channels_drops_the_channels_flag(self):
        _result, record = self.launch('--no-channels', '--', 'claude', '-p', 'hi')
        self.assertEqual(record['argv'], ['--session-id', record['session_id'], '-p', 'hi'])

    def test_the_users_own_session_flag_stands(self):
        for own in (['--continue'], ['-c'], ['--resume', 'abc'], ['-r', 'abc'],
                    ['--session-id', str(uuid.uuid4())]):
            with self.subTest(own=own):
                _result, record = self.launch('--', 'claude', *own)
                self.assertEqual(record['argv'], CHANNELS + own)

    def test_continue_resumes_the_newest_meshd_session_of_the_directory(self):
        _result, first = self.launch('--', 'claude')
        earlier = first['session_id']
        touch(os.path.join(self.projects, earlier + '.jsonl'), 1_000_000)
        # A newer transcript meshd did not launch (no keypair) is not a meshd session.
        touch(os.path.join(self.projects, str(uuid.uuid4()) + '.jsonl'), 2_000_000)
        result, record = self.launch('--continue', '--', 'claude')
        self.assertEqual(record['argv'], ['--resume', earlier] + CHANNELS)
        self.assertEqual(record['session_id'], earlier)
        self.assertNotIn('no earlier meshd session', result.stderr)

    def test_continue_without_a_transcript_starts_a_fresh_session(self):
        _result, first = self.launch('--', 'claude')   # a keypair, but no transcript
        result, record = self.launch('--continue', '--', 'claude')
        self.assertFreshSession(record)
        self.assertNotEqual(record['session_id'], first['session_id'])
        self.assertIn('meshd: no earlier meshd session in this directory; starting a new one',
                      result.stderr)

    def test_other_commands_get_their_arguments_unchanged(self):
        args = ['--resume', 'abc', '--continue', '-p', 'hi']
        _result, record = self.launch('--resume', str(uuid.uuid4()), '--', 'not-claude', *args)
        self.assertEqual(record['argv'], args)
        _result, record = self.launch('--', sys.executable, os.path.join(self.bin, 'claude'),
                                      '--model', 'x')
        self.assertEqual(record['argv'], ['--model', 'x'])   # argv[0] is python, not claude


class ClaudeArgumentsTest(unittest.TestCase):
    """is_claude and claude_arguments: which flags meshd puts before the user's own."""

    SID = '0b9b3c1e-8a51-4c55-9d0a-2f0f8e6f4a11'

    def test_is_claude_is_the_exact_basename(self):
        self.assertTrue(is_claude(['claude']))
        self.assertTrue(is_claude(['/opt/bin/claude', '-p']))
        for command in (['claude-code'], ['notclaude'], ['python3', 'claude'], ['claude/x']):
            self.assertFalse(is_claude(command), command)

    def test_new_resumed_and_without_channels(self):
        cases = [((False, True), ['--session-id', self.SID] + CHANNELS),
                 ((True, True), ['--resume', self.SID] + CHANNELS),
                 ((False, False), ['--session-id', self.SID]),
                 ((True, False), ['--resume', self.SID])]
        for (resumed, channels), flags in cases:
            self.assertEqual(
                claude_arguments(['/usr/bin/claude', '--model', 'x'], self.SID, resumed,
                                 channels),
                ['/usr/bin/claude'] + flags + ['--model', 'x'])

    def test_the_users_session_and_channels_flags_are_not_doubled(self):
        for own in ('--session-id', '--resume', '-r', '--continue', '-c'):
            for resumed in (False, True):
                self.assertEqual(claude_arguments(['claude', own, 'v'], self.SID, resumed, True),
                                 ['claude'] + CHANNELS + [own, 'v'])
        command = ['claude'] + CHANNELS
        self.assertEqual(claude_arguments(command, self.SID, False, True),
                         ['claude', '--session-id', self.SID] + CHANNELS)

    def test_flags_given_with_a_value_attached_count_too(self):
        for own in ('--resume=abc', '--session-id=%s' % self.SID, '-rabc'):
            self.assertEqual(claude_arguments(['claude', own], self.SID, False, True),
                             ['claude'] + CHANNELS + [own])
        command = ['claude', '--dangerously-load-development-channels=server:meshd']
        self.assertEqual(claude_arguments(command, self.SID, False, True),
                         ['claude', '--session-id', self.SID] + command[1:])


class LatestSessionTest(unittest.TestCase):
    """latest_session: the newest transcript of the directory with a meshd keypair."""

    CWD = '/srv/my.project_1'

    def setUp(self):
        self.home = short_tempdir()
        self.addCleanup(shutil.rmtree, self.home, True)
        self.paths = Paths(os.path.join(self.home, 'meshd'))
        self.folder = os.path.join(self.home, '.claude', 'projects', '-srv-my-project-1')

    def session(self, mtime, keypair=True, mesh='team', folder=None):
        session_id = str(uuid.uuid4())
        if keypair:
            self.assertTrue(keystore.load_or_create(self.paths, mesh, session_id).persisted)
        touch(os.path.join(folder or self.folder, session_id + '.jsonl'), mtime)
        return session_id

    def latest(self, cwd=CWD):
        return latest_session(self.paths, 'team', cwd, home=self.home)

    def test_none_without_transcripts(self):
        self.assertIsNone(self.latest())
        self.session(1_000, keypair=False)
        self.assertIsNone(self.latest())

    def test_the_newest_by_mtime_wins_and_unknown_ids_are_skipped(self):
        older = self.session(1_000)
        newest = self.session(3_000)
        self.session(2_000)
        self.session(4_000, keypair=False)             # Claude Code alone, not meshd
        self.session(5_000, mesh='other')              # meshd, but another mesh
        self.assertEqual(self.latest(), newest)
        os.utime(os.path.join(self.folder, older + '.jsonl'), (6_000, 6_000))
        self.assertEqual(self.latest(), older)

    def test_only_this_directorys_transcripts(self):
        other = os.path.join(self.home, '.claude', 'projects', '-srv-other')
        self.session(9_000, folder=other)
        self.assertIsNone(self.latest())
        mine = self.session(1_000)
        self.assertEqual(self.latest(), mine)
        self.assertIsNone(self.latest('/srv/elsewhere'))

    def test_glob_characters_in_the_directory_match_only_themselves(self):
        self.session(1_000, folder=os.path.join(self.home, '.claude', 'projects', '-tmp-proj1'))
        for cwd in ('/tmp/proj[1]', '/tmp/proj*', '/tmp/proj?'):
            self.assertIsNone(self.latest(cwd), cwd)
