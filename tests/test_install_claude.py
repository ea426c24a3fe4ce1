"""`meshd install-claude` / `uninstall-claude` (meshd/claude/install.py) on temporary homes.

Every test works on a home from short_tempdir(), never on the real ~, and checks file
contents, modes and backups byte for byte: Claude Code's files belong to the user.
"""
import json
import os
import shutil
import stat
import unittest

from meshd.claude import install as installer
from meshd.exceptions import ClaudeConfigError
from tests.base import short_tempdir

ENTRY = ['/usr/bin/python3', '/usr/share/meshd/meshd.py']
OTHER_ENTRY = ['/venv/bin/python', '-m', 'meshd']
EVENTS = ('SessionStart', 'UserPromptSubmit', 'PostToolUse', 'Stop')
FOREIGN_HOOK = {'hooks': [{'type': 'command', 'command': 'other-tool prompt', 'timeout': 3}]}
CLAUDE_JSON = {'numStartups': 42, 'projects': {'/src/app': {'allowedTools': ['Bash']}},
               'mcpServers': {'other': {'type': 'stdio', 'command': '/bin/other', 'args': []}},
               'oauthAccount': {'emailAddress': 'someone@example.com'}}
SETTINGS = {'permissions': {'allow': ['Bash(ls:*)']}, 'hooks': {'UserPromptSubmit': [FOREIGN_HOOK]}}


def write_json(path, obj, mode=0o644, indent=4):
    """A file as another tool wrote it (another indent, so a rewrite would show)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as handle:
        json.dump(obj, handle, indent=indent)
    os.chmod(path, mode)


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def snapshot(root):
    """Every file and directory under `root`: relative path -> (bytes or 'dir', mode)."""
    found = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if os.path.isdir(path):
                found[os.path.relpath(path, root)] = ('dir', mode)
            else:
                with open(path, 'rb') as handle:
                    found[os.path.relpath(path, root)] = (handle.read(), mode)
    return found


def inode_numbers(root):
    """Relative path -> inode: an atomic rewrite, even with the same bytes, changes it."""
    return {os.path.relpath(os.path.join(directory, name), root):
            os.stat(os.path.join(directory, name)).st_ino
            for directory, _dirs, filenames in os.walk(root) for name in filenames}


def meshd_hooks(settings, event):
    """The hook entries of `event` whose command is a meshd hook command."""
    return [entry for entry in settings.get('hooks', {}).get(event, [])
            if entry['hooks'][0]['command'].endswith(' hook ' + event)]


class InstallClaudeTest(unittest.TestCase):

    def setUp(self):
        self.home = short_tempdir()
        self.addCleanup(shutil.rmtree, self.home, True)
        self.manifest = os.path.join(self.home, '.meshd', 'claude-install.json')
        self.claude_json = os.path.join(self.home, '.claude.json')
        self.settings = os.path.join(self.home, '.claude', 'settings.json')
        self.skill = os.path.join(self.home, '.claude', 'skills', 'meshd', 'SKILL.md')

    def install(self, entry=ENTRY, **kwargs):
        return installer.install(self.home, entry, self.manifest, **kwargs)

    def uninstall(self, **kwargs):
        return installer.uninstall(self.home, self.manifest, **kwargs)

    def existing_config(self):
        write_json(self.claude_json, CLAUDE_JSON, mode=0o600)
        write_json(self.settings, SETTINGS)

    def actions(self, report):
        return {os.path.relpath(row['path'], self.home): row['action'] for row in report['files']}

    def backups(self):
        return sorted(os.path.join(self.home, name) for name in snapshot(self.home)
                      if '.meshd-backup-' in name)

    def test_install_keeps_foreign_keys_and_adds_meshd(self):
        self.existing_config()
        before_claude, before_settings = (open(p, 'rb').read()
                                          for p in (self.claude_json, self.settings))
        report = self.install()
        self.assertEqual(report['scope'], 'user')
        self.assertEqual(self.actions(report), {'.claude.json': 'updated',
                                                '.claude/settings.json': 'updated',
                                                '.claude/skills/meshd/SKILL.md': 'created'})
        claude = read_json(self.claude_json)
        self.assertEqual(list(claude), list(CLAUDE_JSON))          # key order kept
        for key in ('numStartups', 'projects', 'oauthAccount'):
            self.assertEqual(claude[key], CLAUDE_JSON[key])
        self.assertEqual(claude['mcpServers']['other'], CLAUDE_JSON['mcpServers']['other'])
        self.assertEqual(claude['mcpServers']['meshd'], {
            'type': 'stdio', 'command': '/usr/bin/python3',
            'args': ['/usr/share/meshd/meshd.py', 'mcp'], 'env': {}})
        settings = read_json(self.settings)
        self.assertEqual(settings['permissions'], SETTINGS['permissions'])
        self.assertEqual(settings['hooks']['UserPromptSubmit'][0], FOREIGN_HOOK)
        for event in EVENTS:
            self.assertEqual(meshd_hooks(settings, event), [{'hooks': [{
                'type': 'command', 'timeout': 5,
                'command': '/usr/bin/python3 /usr/share/meshd/meshd.py hook ' + event}]}])
        with open(self.skill) as handle:
            self.assertTrue(handle.read().startswith('---\nname: meshd\ndescription: '))
        # each changed file was backed up once, byte for byte, with its mode
        rows = {row['path']: row['backup'] for row in report['files']}
        self.assertIsNone(rows[self.skill])
        for path, before in ((self.claude_json, before_claude), (self.settings, before_settings)):
            self.assertRegex(rows[path], r'\.meshd-backup-\d{8}T\d{6}Z$')
            with open(rows[path], 'rb') as handle:
                self.assertEqual(handle.read(), before)
            self.assertEqual(stat.S_IMODE(os.stat(rows[path]).st_mode),
                             stat.S_IMODE(os.stat(path).st_mode))
        self.assertEqual(stat.S_IMODE(os.stat(self.claude_json).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.manifest).st_mode), 0o600)
        self.assertEqual(len(self.backups()), 2)

    def test_second_install_changes_nothing(self):
        self.existing_config()
        self.install()
        before, inodes = snapshot(self.home), inode_numbers(self.home)
        report = self.install()
        self.assertEqual(set(self.actions(report).values()), {'unchanged'})
        self.assertTrue(all(row['backup'] is None for row in report['files']))
        self.assertEqual(snapshot(self.home), before)     # no new backup, manifest unchanged
        self.assertEqual(inode_numbers(self.home), inodes)   # and nothing rewritten the same

    def test_uninstall_restores_bytes_and_removes_skill(self):
        self.existing_config()
        before = snapshot(self.home)
        self.install()
        report = self.uninstall()
        self.assertEqual(self.actions(report), {'.claude.json': 'restored',
                                                '.claude/settings.json': 'restored',
                                                '.claude/skills/meshd/SKILL.md': 'removed'})
        after = snapshot(self.home)
        for name in ('.claude.json', '.claude/settings.json'):
            self.assertEqual(after[name], before[name])
        self.assertFalse(os.path.exists(os.path.dirname(self.skill)))
        self.assertFalse(os.path.exists(os.path.join(self.home, '.claude', 'skills')))
        self.assertFalse(os.path.exists(self.manifest))
        # only the install's backups are left over
        self.assertEqual(set(after) - set(before), {'.meshd'} | {
            os.path.relpath(path, self.home) for path in self.backups()})

    def test_empty_home_created_with_modes_and_removed(self):
        report = self.install()
        self.assertEqual(set(self.actions(report).values()), {'created'})
        modes = {path: stat.S_IMODE(os.stat(path).st_mode)
                 for path in (self.claude_json, self.settings, self.skill,
                              os.path.join(self.home, '.claude'), os.path.dirname(self.skill))}
        self.assertEqual(modes, {self.claude_json: 0o600, self.settings: 0o644, self.skill: 0o644,
                                 os.path.join(self.home, '.claude'): 0o700,
                                 os.path.dirname(self.skill): 0o700})
        self.assertEqual(read_json(self.claude_json), {'mcpServers': {'meshd': {
            'type': 'stdio', 'command': ENTRY[0], 'args': ENTRY[1:] + ['mcp'], 'env': {}}}})
        self.assertEqual(sorted(read_json(self.settings)['hooks']), sorted(EVENTS))
        self.assertEqual(self.backups(), [])
        report = self.uninstall()
        self.assertEqual(set(self.actions(report).values()), {'removed'})
        self.assertEqual(snapshot(self.home), {'.meshd': ('dir', 0o700)})   # meshd's own home
        self.assertIn(os.path.join(self.home, '.claude'), report['removed_dirs'])

    def test_previous_meshd_server_comes_back(self):
        theirs = {'type': 'stdio', 'command': '/opt/old-meshd', 'args': ['serve'],
                  'env': {'A': 'b'}}
        write_json(self.claude_json, {'numStartups': 1, 'mcpServers': {'meshd': theirs}}, 0o600)
        self.install()
        self.assertEqual(read_json(self.claude_json)['mcpServers']['meshd']['command'], ENTRY[0])
        self.install(OTHER_ENTRY)                 # a re-install must not record ours as theirs
        # Claude Code rewrites the file since: uninstall has to merge, not restore bytes
        claude = read_json(self.claude_json)
        claude['numStartups'] = 2
        write_json(self.claude_json, claude, 0o600, indent=2)
        report = self.uninstall()
        self.assertEqual(self.actions(report)['.claude.json'], 'updated')
        self.assertEqual(read_json(self.claude_json),
                         {'numStartups': 2, 'mcpServers': {'meshd': theirs}})

    def test_user_edit_survives_uninstall(self):
        self.existing_config()
        self.install()
        claude = read_json(self.claude_json)
        claude['numStartups'] = 43
        claude['mcpServers']['mine'] = {'type': 'stdio', 'command': '/bin/mine', 'args': []}
        write_json(self.claude_json, claude, 0o600, indent=2)
        settings = read_json(self.settings)
        settings['hooks']['Stop'].insert(0, {'hooks': [{'type': 'command', 'command': 'ding'}]})
        settings['model'] = 'opus'
        write_json(self.settings, settings, indent=2)
        edited = snapshot(self.home)
        report = self.uninstall()
        self.assertEqual(self.actions(report), {'.claude.json': 'updated',
                                                '.claude/settings.json': 'updated',
                                                '.claude/skills/meshd/SKILL.md': 'removed'})
        claude = read_json(self.claude_json)
        self.assertEqual(claude['numStartups'], 43)
        self.assertEqual(sorted(claude['mcpServers']), ['mine', 'other'])
        settings = read_json(self.settings)
        self.assertEqual(settings['model'], 'opus')
        self.assertEqual(settings['hooks'], {
            'UserPromptSubmit': [FOREIGN_HOOK],
            'Stop': [{'hooks': [{'type': 'command', 'command': 'ding'}]}]})
        # the edited files were backed up before the merge
        for row in report['files'][:2]:
            with open(row['backup'], 'rb') as handle:
                self.assertEqual(handle.read(), edited[os.path.relpath(row['path'], self.home)][0])

    def test_edit_between_installs_survives_uninstall(self):
        self.existing_config()
        self.install()
        settings = read_json(self.settings)
        settings['permissions']['deny'] = ['Bash(rm:*)']
        write_json(self.settings, settings, indent=2)
        self.install(OTHER_ENTRY)       # rewrites the file: its bytes now hash as meshd's again
        self.uninstall()                # but the bytes from before install would lose the edit
        self.assertEqual(read_json(self.settings),
                         dict(SETTINGS, permissions={'allow': ['Bash(ls:*)'],
                                                     'deny': ['Bash(rm:*)']}))

    def test_merge_removes_the_keys_install_created(self):
        self.install()
        write_json(self.claude_json, dict(read_json(self.claude_json), numStartups=1), 0o600)
        write_json(self.settings, dict(read_json(self.settings), model='opus'))
        self.uninstall()
        self.assertEqual(read_json(self.claude_json), {'numStartups': 1})
        self.assertEqual(read_json(self.settings), {'model': 'opus'})

    def test_identical_hook_already_there_stays_theirs(self):
        by_hand = {'hooks': [{'type': 'command', 'timeout': 5,
                              'command': '/usr/bin/python3 /usr/share/meshd/meshd.py hook Stop'}]}
        write_json(self.settings, {'hooks': {'Stop': [by_hand]}, 'model': 'opus'})
        self.install()
        self.assertEqual(read_json(self.settings)['hooks']['Stop'], [by_hand])   # not twice
        write_json(self.settings, dict(read_json(self.settings), model='sonnet'))
        self.uninstall()
        self.assertEqual(read_json(self.settings),
                         {'hooks': {'Stop': [by_hand]}, 'model': 'sonnet'})

    def test_edited_skill_is_kept(self):
        self.install()
        with open(self.skill, 'a') as handle:
            handle.write('\nMy own notes.\n')
        report = self.uninstall()
        self.assertEqual(self.actions(report)['.claude/skills/meshd/SKILL.md'], 'kept')
        self.assertTrue(any(self.skill in note for note in report['notes']))
        with open(self.skill) as handle:
            self.assertTrue(handle.read().endswith('My own notes.\n'))
        self.assertFalse(os.path.exists(self.settings))
        self.assertFalse(os.path.exists(self.manifest))

    def test_reinstall_with_other_entry_replaces_ours(self):
        self.existing_config()
        self.install()
        report = self.install(OTHER_ENTRY)
        self.assertEqual(self.actions(report)['.claude/skills/meshd/SKILL.md'], 'unchanged')
        claude = read_json(self.claude_json)
        self.assertEqual(sorted(claude['mcpServers']), ['meshd', 'other'])
        self.assertEqual(claude['mcpServers']['meshd']['args'], ['-m', 'meshd', 'mcp'])
        settings = read_json(self.settings)
        for event in EVENTS:
            ours = meshd_hooks(settings, event)
            self.assertEqual([entry['hooks'][0]['command'] for entry in ours],
                             ['/venv/bin/python -m meshd hook ' + event])
        # meshd's entry kept its place, after the foreign hook
        self.assertEqual(settings['hooks']['UserPromptSubmit'][0], FOREIGN_HOOK)
        self.assertEqual(len(settings['hooks']['UserPromptSubmit']), 2)
        # and uninstall still removes every trace
        self.uninstall()
        self.assertEqual(read_json(self.claude_json), CLAUDE_JSON)
        self.assertEqual(read_json(self.settings), SETTINGS)

    def test_project_scope(self):
        project = os.path.join(self.home, 'src', 'app')
        os.makedirs(project)
        self.install()                                  # user scope too: both coexist
        user_files = snapshot(self.home)
        report = self.install(project=project)
        self.assertEqual(report['scope'], 'project')
        self.assertEqual(read_json(os.path.join(project, '.mcp.json'))['mcpServers']['meshd'],
                         {'type': 'stdio', 'command': ENTRY[0], 'args': ENTRY[1:] + ['mcp'],
                          'env': {}})
        self.assertEqual(sorted(read_json(os.path.join(project, '.claude', 'settings.json'))
                                ['hooks']), sorted(EVENTS))
        self.assertTrue(os.path.isfile(os.path.join(project, '.claude', 'skills', 'meshd',
                                                    'SKILL.md')))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(project, '.mcp.json')).st_mode), 0o644)
        for name in ('.claude.json', '.claude/settings.json'):
            self.assertEqual(snapshot(self.home)[name], user_files[name])
        self.assertEqual(len(read_json(self.manifest)['files']), 6)
        self.uninstall(project=project)
        self.assertEqual(os.listdir(project), [])
        self.assertEqual(len(read_json(self.manifest)['files']), 3)   # user scope still recorded
        self.assertIn('meshd', read_json(self.claude_json)['mcpServers'])

    def test_missing_project_directory(self):
        with self.assertRaisesRegex(ClaudeConfigError, 'no such project directory'):
            self.install(project=os.path.join(self.home, 'nowhere'))

    def test_dry_run_writes_nothing_and_shows_diffs(self):
        self.existing_config()
        before = snapshot(self.home)
        report = self.install(dry_run=True)
        self.assertTrue(report['dry_run'])
        self.assertEqual(snapshot(self.home), before)
        rows = {row['path']: row for row in report['files']}
        diff = rows[self.claude_json]['diff']
        self.assertTrue(diff.startswith('--- a/%s\n+++ b/%s\n' % (self.claude_json,
                                                                 self.claude_json)))
        self.assertIn('+      "command": "/usr/bin/python3",', diff)
        self.assertIn('hook Stop', rows[self.settings]['diff'])
        self.assertIn('+name: meshd', rows[self.skill]['diff'])
        self.assertEqual(self.actions(report)['.claude.json'], 'updated')
        # the uninstall dry-run shows the way back, and writes nothing either
        self.install()
        installed = snapshot(self.home)
        report = self.uninstall(dry_run=True)
        self.assertEqual(snapshot(self.home), installed)
        rows = {row['path']: row for row in report['files']}
        self.assertIn('-      "command": "/usr/bin/python3",', rows[self.claude_json]['diff'])
        self.assertIn('-name: meshd', rows[self.skill]['diff'])
        # nothing to change: no diff at all
        report = self.install(dry_run=True)
        self.assertTrue(all('diff' not in row for row in report['files']))

    def test_malformed_files_raise_and_change_nothing(self):
        cases = [('settings', '{"hooks": {"Stop": [}'),
                 ('settings', '["not", "an", "object"]'),
                 ('settings', '{"hooks": []}'),
                 ('settings', '{"hooks": {"PostToolUse": {"hooks": []}}}'),
                 ('claude', '{"mcpServers": ["meshd"]}'),
                 ('claude', b'{"a": "\xff"}')]
        for which, text in cases:
            with self.subTest(text=text):
                self.existing_config()
                path = self.settings if which == 'settings' else self.claude_json
                with open(path, 'wb') as handle:
                    handle.write(text if isinstance(text, bytes) else text.encode())
                before = snapshot(self.home)
                for call in (self.install, lambda: self.install(dry_run=True)):
                    with self.assertRaises(ClaudeConfigError) as caught:
                        call()
                    self.assertIn(path, str(caught.exception))
                    self.assertNotIn('\n', str(caught.exception))
                self.assertEqual(snapshot(self.home), before)   # nor the other file, nor a manifest

    def test_malformed_file_at_uninstall_changes_nothing(self):
        self.existing_config()
        self.install()
        with open(self.settings, 'w') as handle:
            handle.write('{"hooks": ')
        before = snapshot(self.home)
        with self.assertRaisesRegex(ClaudeConfigError, 'settings.json is not valid JSON'):
            self.uninstall()
        self.assertEqual(snapshot(self.home), before)

    def test_meshd_home_adds_env_and_hook_prefix(self):
        meshd_home = os.path.join(self.home, 'my mesh')
        self.install(meshd_home=meshd_home)
        self.assertEqual(read_json(self.claude_json)['mcpServers']['meshd']['env'],
                         {'MESHD_HOME': meshd_home})
        settings = read_json(self.settings)
        for event in EVENTS:
            self.assertEqual(meshd_hooks(settings, event)[0]['hooks'][0]['command'],
                             "MESHD_HOME='%s' /usr/bin/python3 /usr/share/meshd/meshd.py hook %s"
                             % (meshd_home, event))

    def test_entry_words_are_shell_quoted(self):
        self.install(['/opt/my tools/python3', "/opt/it's/meshd.py"])
        command = read_json(self.settings)['hooks']['Stop'][0]['hooks'][0]['command']
        self.assertEqual(command, "'/opt/my tools/python3' '/opt/it'\"'\"'s/meshd.py' hook Stop")
        self.assertEqual(read_json(self.claude_json)['mcpServers']['meshd']['command'],
                         '/opt/my tools/python3')

    def test_uninstall_with_nothing_installed(self):
        self.existing_config()
        before = snapshot(self.home)
        report = self.uninstall()
        self.assertEqual(report['files'], [])
        self.assertIn('not installed', ' '.join(report['notes']))
        self.assertEqual(snapshot(self.home), before)

    def test_existing_modes_kept_and_backup_names_unique(self):
        self.existing_config()
        os.chmod(self.settings, 0o640)
        self.install()
        self.install(OTHER_ENTRY)           # the same second: the backup name gets a counter
        self.assertEqual(stat.S_IMODE(os.stat(self.settings).st_mode), 0o640)
        backups = [path for path in self.backups() if path.startswith(self.settings)]
        self.assertEqual(len(backups), 2)
        self.assertTrue(all(stat.S_IMODE(os.stat(path).st_mode) == 0o640 for path in backups))

    def test_symlinked_settings_stay_a_link(self):
        dotfiles = os.path.join(self.home, 'dotfiles')
        write_json(os.path.join(dotfiles, 'settings.json'), SETTINGS)
        os.makedirs(os.path.dirname(self.settings))
        os.symlink(os.path.join(dotfiles, 'settings.json'), self.settings)
        self.install()
        self.assertTrue(os.path.islink(self.settings))
        self.assertEqual(len(meshd_hooks(read_json(os.path.join(dotfiles, 'settings.json')),
                                         'Stop')), 1)

    def test_skill_text(self):
        text = installer.SKILL_TEXT
        self.assertLess(len(text.splitlines()), 60)
        front = text.split('---\n')[1]
        self.assertIn('name: meshd\n', front)
        self.assertRegex(front, r'description: .*(session|agent).*\n')
        for word in ('<channel source="meshd"', 'send_message', 'reply_to_id', 'meshd send',
                     'list_peers', 'meshd peers', 'read_inbox', 'meshd inbox', 'mesh_status',
                     '@group', '`*`', '`now`', '`next`', '`low`', 'not end-to-end encrypted'):
            self.assertIn(word, text)
