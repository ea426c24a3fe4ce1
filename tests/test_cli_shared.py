"""The shared-data and moderation verbs end to end (docs/local-api.md, "Shared data, presence,
moderation, grants and message status"): a real broker, alice's and bob's daemons, and the
CLI run as a process against them."""
import json
import os
import subprocess

from tests.base import DEADLINE, MeshdTestCase, short_tempdir, wait_for
from tests.links_base import LinksTestCase

USAGE, RUNTIME = 2, 1

SKILL_FILE = '''---
name: deploy-service
description: "How we deploy a service"
tags: [ops, 'ci']
---

# Deploy

1. Run the tests.
2. Tag the release.
'''


class SharedCliCase(LinksTestCase):
    """alice's daemon in self.home, bob's in its own."""

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.da = self.daemon([self.alice], home=self.home)
        self.db = self.daemon([self.bob])

    def ok(self, *args, home=None, input=None):
        """stdout of a command that must succeed."""
        result = self.run_cli(*args, home=home, input=input)
        self.assertEqual(result.returncode, 0, (args, result.stdout, result.stderr))
        return result.stdout

    def at_bob(self, *args, input=None):
        return self.ok(*args, home=self.db.home, input=input)

    def eventually(self, args, check, home=None, what=None):
        """Run `args` until `check(stdout)` is true (what another daemon wrote may take a
        moment to reach the broker); return that stdout."""
        def attempt():
            result = self.run_cli(*args, home=home)
            return result.stdout if result.returncode == 0 and check(result.stdout) else None
        return wait_for(attempt, what=what or ' '.join(args))

    def fails(self, args, code, text, home=None):
        """A command that fails with `code` and one line on stderr containing `text`."""
        result = self.run_cli(*args, home=home)
        self.assertEqual(result.returncode, code, (args, result.stdout, result.stderr))
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, (args, result.stderr))
        self.assertIn(text, lines[0], args)
        self.assertNotIn('Traceback', result.stderr)
        return lines[0]


class SharedDataTest(SharedCliCase):

    def test_state_set_by_alice_reads_the_same_at_bob(self):
        self.assertEqual(self.ok('state', 'set', 'counter', '42').strip(),
                         '✔ counter = 42 on team')
        self.ok('state', 'set', 'motto', 'ship it')             # not JSON: text
        self.ok('state', 'set', '--string', 'build', '42')      # JSON, but forced to text
        self.ok('state', 'set', 'config', '{"replicas": [1, 2]}')
        self.assertEqual(self.eventually(('state', 'get', 'counter'), lambda out: out.strip(),
                                         home=self.db.home).strip(), '42')
        self.assertEqual(self.eventually(('state', 'get', 'config'), bool, home=self.db.home),
                         self.ok('state', 'get', 'config'))
        self.assertEqual(json.loads(self.at_bob('state', 'get', 'config')), {'replicas': [1, 2]})
        self.assertEqual(self.at_bob('state', 'get', 'motto').strip(), '"ship it"')
        self.assertEqual(self.at_bob('state', 'get', 'build').strip(), '"42"')
        whole = json.loads(self.at_bob('state', 'get', 'counter', '--json'))['state']
        self.assertEqual((whole['key'], whole['value'], whole['updatedBy'], whole['mesh']),
                         ('counter', 42, 'alice', 'team'))
        self.ok('state', 'set', 'counter', '43')
        self.eventually(('state', 'get', 'counter'), lambda out: out.strip() == '43',
                        home=self.db.home)

        table = self.at_bob('state', 'list').splitlines()
        self.assertEqual(table[0].split(), ['KEY', 'VALUE', 'UPDATED', 'BY', 'UPDATED', 'AT',
                                            'MESH'])
        counter = next(line for line in table if line.startswith('counter '))
        self.assertEqual(counter.split()[:3], ['counter', '43', 'alice'])
        self.assertTrue(counter.endswith(' team'), counter)
        listed = json.loads(self.at_bob('state', 'list', '--json'))
        self.assertEqual(sorted(e['key'] for e in listed['entries']),
                         ['build', 'config', 'counter', 'motto'])
        self.assertEqual(listed['unreachable'], [])

    def test_a_long_value_is_cut_to_fit_the_table(self):
        self.ok('state', 'set', 'essay', 'x' * 500)
        line = next(l for l in self.ok('state', 'list').splitlines() if l.startswith('essay'))
        self.assertIn('…', line)
        self.assertLess(len(line), 200)

    def test_remember_recall_forget(self):
        memory_id = self.ok('remember', 'deploys', 'use', 'blue-green', '--tag', 'ops,deploy',
                            '--tag', 'infra').strip()
        self.assertTrue(memory_id and ' ' not in memory_id, memory_id)
        found = self.eventually(('recall', 'blue-green'), lambda out: memory_id in out,
                                home=self.db.home)
        line = next(l for l in found.splitlines() if l.startswith(memory_id))
        self.assertIn('  alice  ', line)
        self.assertTrue(line.endswith('deploys use blue-green'), line)
        match = json.loads(self.at_bob('recall', 'blue-green', '--json'))['matches'][0]
        self.assertEqual((match['id'], match['tags'], match['mesh']),
                         (memory_id, ['ops', 'deploy', 'infra'], 'team'))

        two_lines = self.ok('remember', '-', input='first line\nsecond line\n').strip()
        line = next(l for l in self.ok('recall', 'first').splitlines()
                    if l.startswith(two_lines))
        self.assertTrue(line.endswith('first line …'), line)

        self.assertEqual(self.ok('forget', memory_id).strip(),
                         '✔ forgot %s on team' % memory_id)
        gone = self.eventually(('recall', 'blue-green'), lambda out: memory_id not in out,
                               home=self.db.home)
        self.assertEqual(gone.strip(), '(no memory matches "blue-green")')

    def test_skill_publish_list_get_remove(self):
        folder = short_tempdir()
        self.addCleanup(__import__('shutil').rmtree, folder, True)
        path = os.path.join(folder, 'deploy.md')
        with open(path, 'w') as handle:
            handle.write(SKILL_FILE)
        self.assertEqual(self.ok('skill', 'publish', path).strip(),
                         '✔ published skill deploy-service on team')
        listed = self.eventually(('skill', 'list'), lambda out: 'deploy-service' in out,
                                 home=self.db.home)
        self.assertIn('deploy-service — How we deploy a service [ops, ci] (by alice on team)',
                      listed)
        self.assertIn('deploy-service', self.at_bob('skill', 'list', 'ops'))
        self.assertEqual(self.at_bob('skill', 'list', 'nothing-like-it').strip(),
                         '(no skills match "nothing-like-it")')
        self.assertEqual(self.at_bob('skill', 'get', 'deploy-service'),
                         '# Deploy\n\n1. Run the tests.\n2. Tag the release.\n')
        skill = json.loads(self.at_bob('skill', 'get', 'deploy-service', '--json'))['skill']
        self.assertEqual((skill['description'], skill['tags'], skill['author'], skill['mesh']),
                         ('How we deploy a service', ['ops', 'ci'], 'alice', 'team'))

        # No front matter: the name is the file's stem; options win over front matter.
        plain = os.path.join(folder, 'notes.md')
        with open(plain, 'w') as handle:
            handle.write('Write things down.\n')
        self.assertIn('published skill notes on team', self.ok('skill', 'publish', plain))
        self.ok('skill', 'publish', '-', '--name', 'piped', '--description', 'from stdin',
                '--tag', 'a,b', input=SKILL_FILE)
        piped = json.loads(self.ok('skill', 'get', 'piped', '--json'))['skill']
        self.assertEqual((piped['name'], piped['description'], piped['tags']),
                         ('piped', 'from stdin', ['a', 'b']))

        self.assertEqual(self.ok('skill', 'remove', 'deploy-service').strip(),
                         '✔ removed skill deploy-service from team')
        wait_for(lambda: self.run_cli('skill', 'get', 'deploy-service',
                                      home=self.db.home).returncode == RUNTIME,
                 what='the skill to be gone at bob')
        self.fails(['skill', 'get', 'deploy-service'], RUNTIME, 'skill get failed: ',
                   home=self.db.home)
        self.fails(['skill', 'remove', 'deploy-service'], RUNTIME,
                   'no skill "deploy-service" on team')


class PresenceTest(SharedCliCase):

    def alice_row(self, peers_output):
        return next((p for p in json.loads(peers_output)
                     if p.get('pubkey') == self.alice['pubkey']), None)

    def test_profile_summary_and_status_show_in_the_other_daemons_peers(self):
        out = self.ok('profile', '--summary', 'reviewing PR 12', '--status', 'dnd')
        self.assertTrue(out.startswith('✔ profile '), out)
        self.assertTrue(out.strip().endswith(' set on team'), out)
        self.eventually(('peers', '--json'), lambda out: (self.alice_row(out) or {}).get(
            'summary') == 'reviewing PR 12', home=self.db.home, what='alice summary at bob')
        row = self.alice_row(self.at_bob('peers', '--json'))
        self.assertEqual(row['status'], 'dnd')
        applied = json.loads(self.ok('profile', '--title', 'reviewer', '--json'))
        self.assertEqual((applied['applied'], applied['meshes']), (['title'], ['team']))

    def test_group_join_and_leave(self):
        out = self.at_bob('group', 'join', '@reviewers', '--role', 'lead')
        self.assertEqual(out.strip(), '✔ joined @reviewers as lead on team')

        def bob_groups(out):
            row = next((p for p in json.loads(out) if p.get('pubkey') == self.bob['pubkey']),
                       None)
            return [g.get('name', '').lstrip('@') for g in (row or {}).get('groups') or []]
        self.eventually(('peers', '--json'), lambda out: 'reviewers' in bob_groups(out),
                        what='bob in @reviewers, seen by alice')
        self.ok('send', '@reviewers', 'please review')
        rows = self.wait_inbox(self.db, 1)
        self.assertEqual(rows[0]['body'], 'please review')
        self.assertEqual(self.at_bob('group', 'leave', 'reviewers').strip(),
                         '✔ left @reviewers on team')
        self.eventually(('peers', '--json'), lambda out: 'reviewers' not in bob_groups(out),
                        what='bob out of @reviewers, seen by alice')


class GrantsAndStatusTest(SharedCliCase):

    def test_blocked_sender_ends_dead_and_msg_status_says_failed(self):
        out = self.at_bob('grants', 'block', 'alice')
        self.assertTrue(out.startswith('✔ blocked alice (%s…) on team'
                                       % self.alice['pubkey'][:12]), out)
        listed = self.at_bob('grants', 'list')
        self.assertIn('alice', listed)
        self.assertIn('blocked', listed)
        grants = json.loads(self.at_bob('grants', 'list', '--json'))
        self.assertEqual([(g['peer'], g['blocked']) for g in grants['grants']],
                         [(self.alice['pubkey'], True)])

        self.ok('send', 'bob', 'let me in', '--client-message-id', 'cid-blocked')
        dead = self.eventually(('outbox', '--failed', '--json'), lambda out: any(
            row['client_message_id'] == 'cid-blocked' for row in json.loads(out)),
            what='the blocked DM dead in the outbox')
        row = next(r for r in json.loads(dead) if r['client_message_id'] == 'cid-blocked')
        self.assertEqual(row['status'], 'dead')
        self.assertIn('blocked', row['last_error'])
        status = self.ok('msg-status', 'cid-blocked').strip()
        self.assertTrue(status.startswith('failed: '), status)
        self.assertIn('blocked', status)
        self.assertEqual(self.inbox(self.db), [])

        out = self.at_bob('grants', 'revoke', 'alice')
        self.assertIn('has the defaults again', out)
        self.assertIn('(no grants: every peer has the defaults)', self.at_bob('grants', 'list'))
        out = self.at_bob('grants', 'set', 'alice', 'read, dm')
        self.assertEqual(out.strip(), '✔ alice (%s…) may now: read, dm (on team)'
                         % self.alice['pubkey'][:12])

    def test_msg_status_says_queued_then_delivered(self):
        self.db.stop()
        self.ok('send', '--mesh', 'team', self.bob['pubkey'], 'while you were out',
                '--client-message-id', 'cid-queued')
        queued = self.eventually(('msg-status', 'cid-queued'),
                                 lambda out: out.startswith('queued at the broker'),
                                 what='the DM queued at the broker')
        self.assertRegex(queued.strip(), r'^queued at the broker \(expires \d{4}-')
        self.db.start()
        self.wait_link(self.db, 'team')
        delivered = self.eventually(('msg-status', 'cid-queued'),
                                    lambda out: out.startswith('delivered'),
                                    what='the DM delivered')
        self.assertRegex(delivered.strip(), r'^delivered \(at \d{4}-')
        whole = json.loads(self.ok('msg-status', 'cid-queued', '--json'))
        self.assertEqual((whole['delivery'], whole['outbox_status'], whole['mesh']),
                         ('delivered', 'done', 'team'))
        self.fails(['msg-status', 'cid-never-sent'], RUNTIME, 'msg-status failed: ')


class ModerationTest(SharedCliCase):

    def test_an_admin_kicks_bans_and_unbans(self):
        boss = self.member('boss', role='admin')
        boss_daemon = self.daemon([boss])
        token, _key = self.session(self.db, self.bob, 'kick-me')
        out = self.ok('kick', 'kick-me', home=boss_daemon.home)
        self.assertEqual(out.strip(), 'kicked on team: kick-me')
        wait_for(lambda: self.db.call('daemon.health')['sessions'][token[:8]]['state']
                 == 'kicked', what='the session kicked')
        out = self.ok('kick', 'bob', home=boss_daemon.home)   # a daemon: kick leaves it
        self.assertIn('left connected (daemons; ', out)

        self.assertEqual(self.ok('ban', 'bob', home=boss_daemon.home).strip(),
                         '✔ banned bob on team')
        bans = self.ok('bans', home=boss_daemon.home).splitlines()
        self.assertEqual(bans[0].split(), ['NAME', 'KEY', 'BANNED', 'AT', 'MESH'])
        self.assertEqual(bans[1].split()[:2], ['bob', self.bob['pubkey'][:16] + '…'])
        self.assertEqual(self.ok('unban', 'bob', home=boss_daemon.home).strip(),
                         '✔ unbanned bob on team')
        self.assertEqual(self.ok('bans', home=boss_daemon.home).strip(), '(no bans)')

    def test_a_member_is_refused_with_one_line(self):
        self.fails(['kick', 'bob'], RUNTIME, 'kick failed: ')
        self.fails(['ban', 'bob'], RUNTIME, 'ban failed: ')


class BadInvocationTest(SharedCliCase):

    def test_each_bad_invocation_is_one_line_and_exit_2(self):
        missing = os.path.join(self.home, 'no-such-skill.md')
        table = [
            (['state', 'get'], 'the following arguments are required: key'),
            (['state', 'set', 'k'], 'the following arguments are required: value'),
            (['state', 'set', '', '1'], 'the key is empty'),
            (['state', 'get', 'k', '--mesh', 'nope'], 'mesh not attached: nope'),
            (['remember'], 'the following arguments are required: text'),
            (['remember', ' '], 'the text is empty'),
            (['recall'], 'the following arguments are required: query'),
            (['forget'], 'the following arguments are required: ID'),
            (['skill', 'get'], 'the following arguments are required: name'),
            (['skill', 'publish'], 'the following arguments are required: file'),
            (['skill', 'publish', missing], 'cannot read %s' % missing),
            (['profile'], 'give at least one of --summary'),
            (['profile', '--status', 'busy'], "invalid choice: 'busy'"),
            (['profile', '--visible', 'maybe'], "invalid choice: 'maybe'"),
            (['group', 'join'], 'the following arguments are required: name'),
            (['group', 'join', '@'], 'the group name is empty'),
            (['grants', 'set', 'bob'], 'the following arguments are required: capabilities'),
            (['grants', 'set', 'bob', ','], 'no capability given'),
            (['kick'], 'give one of TARGET, --all or --stale SECONDS'),
            (['kick', 'bob', '--all'], 'give one of TARGET, --all or --stale SECONDS'),
            (['disconnect', '--stale', '0'], '--stale takes a number of seconds above 0'),
            (['disconnect', '--stale', 'soon'], "invalid float value: 'soon'"),
            (['ban'], 'the following arguments are required: target'),
            (['msg-status'], 'the following arguments are required: CLIENT_MESSAGE_ID'),
        ]
        for args, text in table:
            self.fails(args, USAGE, text)

    def test_a_runtime_failure_is_one_line_and_exit_1(self):
        self.assertEqual(self.fails(['state', 'get', 'no-such-key'], RUNTIME, 'no-such-key'),
                         'state get failed: no shared state "no-such-key"')
        self.fails(['skill', 'get', 'no-such-skill'], RUNTIME, 'no-such-skill')
        self.fails(['grants', 'block', 'nobody-here'], RUNTIME, 'grants block failed: ')


class NoDaemonTest(MeshdTestCase):

    def test_no_spawn_is_accepted_by_every_new_verb(self):
        for verb in (['state', 'get', 'k'], ['state', 'set', 'k', '1'], ['state', 'list'],
                     ['remember', 'x'], ['recall', 'x'], ['forget', 'x'],
                     ['skill', 'list'], ['skill', 'get', 'x'], ['skill', 'remove', 'x'],
                     ['profile', '--summary', 'x'], ['group', 'join', '@g'],
                     ['group', 'leave', '@g'], ['grants', 'list'], ['grants', 'block', 'x'],
                     ['grants', 'set', 'x', 'dm'], ['grants', 'revoke', 'x'], ['kick', 'x'],
                     ['disconnect', '--all'], ['ban', 'x'], ['unban', 'x'], ['bans'],
                     ['msg-status', 'x']):
            result = self.run_cli(*(verb + ['--no-spawn']))
            self.assertEqual(result.returncode, RUNTIME, (verb, result.stderr))
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
            self.assertIn('start it with `', result.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.home, 'daemon', 'daemon.log')))


class ParserTest(MeshdTestCase):
    """What the parser says, the same on argh 0.26 and 0.31."""

    def test_short_options_and_values(self):
        from meshd.cli import build_parser
        parser = build_parser()
        args = parser.parse_args(['state', 'set', '-s', '-m', 'team', '-j', '-n', 'k', '42'])
        self.assertEqual((args.string, args.mesh, args.json, args.no_spawn, args.value),
                         (True, 'team', True, True, '42'))
        args = parser.parse_args(['remember', '-t', 'a,b', '-t', 'c', 'some', 'text'])
        self.assertEqual((args.tag, args.text), (['a,b', 'c'], ['some', 'text']))
        args = parser.parse_args(['profile', '-c', 'x', '-c', 'y', '-v', 'no'])
        self.assertEqual((args.capability, args.visible), (['x', 'y'], 'no'))
        self.assertEqual(parser.parse_args(['kick', '-a']).all, True)

    def test_every_new_command_has_a_summary_and_completes(self):
        top = self.run_cli('--help').stdout
        for command in ('state', 'skill', 'group', 'grants', 'remember', 'recall', 'forget',
                        'profile', 'kick', 'disconnect', 'ban', 'unban', 'bans', 'msg-status'):
            line = next(l for l in top.splitlines() if l.strip().startswith(command + ' '))
            self.assertGreater(len(line.split()), 1, line)
        for command in (['state', 'set'], ['skill', 'publish'], ['profile'], ['kick']):
            text = self.run_cli(*(command + ['--help'])).stdout
            self.assertNotIn('(default: ', text, command)
        bash = self.run_cli('completion', 'bash').stdout
        for path, expected in (('state', ['get', 'list', 'set']),
                               ('skill', ['get', 'list', 'publish', 'remove']),
                               ('group', ['join', 'leave']),
                               ('grants', ['block', 'list', 'revoke', 'set'])):
            words = subprocess.run(
                ['bash', '-c', 'source /dev/stdin; COMP_WORDS=(meshd %s ""); COMP_CWORD=2; '
                 '_meshd; echo "${COMPREPLY[@]}"' % path], input=bash, capture_output=True,
                text=True, timeout=DEADLINE).stdout.split()
            self.assertEqual(sorted(w for w in words if not w.startswith('-')), expected)
