"""`meshd install-claude` / `uninstall-claude` from the command line, and what they install
really runs: the MCP entry answers a handshake and each hook command exits 0 as Claude Code
would run it (through a shell, with the hook's JSON on stdin)."""
import json
import os
import shutil
import subprocess
import sys

from tests.base import DEADLINE, ENTRY, ROOT, MeshdTestCase, short_tempdir
from tests.claude_base import McpClient

EVENTS = ('SessionStart', 'UserPromptSubmit', 'PostToolUse', 'Stop')


class InstallClaudeCliTest(MeshdTestCase):

    def setUp(self):
        super().setUp()
        self.user_home = short_tempdir()
        self.addCleanup(shutil.rmtree, self.user_home, True)
        self.claude_json = os.path.join(self.user_home, '.claude.json')
        self.settings = os.path.join(self.user_home, '.claude', 'settings.json')
        with open(self.claude_json, 'w') as handle:
            json.dump({'numStartups': 3, 'mcpServers': {'other': {'command': 'x'}}}, handle)
        with open(self.claude_json, 'rb') as handle:
            self.original = handle.read()

    def cli(self, *args):
        return self.run_cli(*args, env={'HOME': self.user_home})

    def read(self, path):
        with open(path, encoding='utf-8') as handle:
            return json.load(handle)

    def test_install_registers_what_runs_and_uninstall_restores(self):
        dry = self.cli('install-claude', '--dry-run')
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn('+++ b/%s' % self.claude_json, dry.stdout)
        self.assertFalse(os.path.exists(self.settings))

        result = self.cli('install-claude', '--json')
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertEqual([row['action'] for row in report['files']],
                         ['updated', 'created', 'created'])
        config = self.read(self.claude_json)
        self.assertEqual(config['numStartups'], 3)
        self.assertEqual(config['mcpServers']['other'], {'command': 'x'})
        server = config['mcpServers']['meshd']
        self.assertEqual((server['type'], server['command'], server['args']),
                         ('stdio', sys.executable, [ENTRY, 'mcp']))
        self.assertEqual(server['env'], {'MESHD_HOME': self.home})

        # The MCP entry, started as Claude Code starts it, answers the handshake.
        env = dict(os.environ, HOME=self.user_home, MESHD_NO_AUTOSPAWN='1', **server['env'])
        client = McpClient(self, env)
        self.assertEqual(client.handshake()[1]['serverInfo']['name'], 'meshd')
        self.assertEqual(client.close(), 0)
        # Each hook command, run through a shell with its JSON on stdin, exits 0 quietly.
        hooks = self.read(self.settings)['hooks']
        for event in EVENTS:
            [entry] = hooks[event]
            command = entry['hooks'][0]['command']
            self.assertTrue(command.endswith(' hook %s' % event), command)
            run = subprocess.run(['sh', '-c', command], input=json.dumps(
                {'hook_event_name': event, 'session_id': 's', 'cwd': ROOT}),
                capture_output=True, text=True, env=dict(os.environ, HOME=self.user_home),
                timeout=DEADLINE)
            self.assertEqual((run.returncode, run.stdout, run.stderr), (0, '', ''))

        again = json.loads(self.cli('install-claude', '--json').stdout)
        self.assertEqual({row['action'] for row in again['files']}, {'unchanged'})

        removed = self.cli('uninstall-claude')
        self.assertEqual(removed.returncode, 0, removed.stderr)
        with open(self.claude_json, 'rb') as handle:
            self.assertEqual(handle.read(), self.original)
        self.assertFalse(os.path.exists(os.path.join(self.user_home, '.claude')))

    def test_a_malformed_file_is_one_line_and_exit_1(self):
        with open(self.claude_json, 'w') as handle:
            handle.write('{not json')
        result = self.cli('install-claude')
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn(self.claude_json, result.stderr)
        with open(self.claude_json) as handle:
            self.assertEqual(handle.read(), '{not json')
