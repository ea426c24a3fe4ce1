"""The CLI as a Unix tool (issue 12): exit codes and one-line errors, a closed stdout, options
that are the same on every argh, stdin where a file would go, and hints that point at
something real."""
import json
import os
import shutil
import subprocess
import sys

from meshd.broker import admin
from tests.base import DEADLINE, ENTRY, ROOT, meshd_env, short_tempdir
from tests.links_base import LinksTestCase

USAGE, RUNTIME = 2, 1


class BadInvocationTest(LinksTestCase):

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.da = self.daemon([self.alice], home=self.home)
        self.db = self.daemon([self.bob])

    def test_each_bad_invocation_is_one_line_and_its_documented_exit_code(self):
        key = self.bob['pubkey']
        table = [
            (['send'], USAGE, 'the following arguments are required'),
            (['send', key, ''], USAGE, 'the message is empty'),
            (['send', '#general', 'hi'], USAGE, '#topics are not supported'),
            (['send', 'nobody-here', 'hi'], RUNTIME, 'No peer matches "nobody-here"'),
            (['send', '--mesh', 'nope', key, 'hi'], USAGE, 'mesh not attached: nope'),
            (['join', 'hello'], USAGE, 'not an invite link'),
            (['leave', 'nope'], RUNTIME, 'not a member of mesh "nope"'),
            (['call', 'daemon.health', '{bad'], USAGE, 'params must be a JSON object'),
            (['call', 'no.such.method'], RUNTIME, 'method not found'),
            (['inbox', '--limit', 'many'], USAGE, "invalid int value: 'many'"),
            (['daemon', 'up', '--tcp', '--no-tcp'], USAGE, '--tcp and --no-tcp'),
            (['no-such-command'], USAGE, "invalid choice: 'no-such-command'"),
        ]
        for args, code, text in table:
            result = self.run_cli(*args)
            self.assertEqual(result.returncode, code, (args, result.stderr))
            lines = result.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, (args, result.stderr))
            self.assertIn(text, lines[0], args)
            self.assertNotIn('Traceback', result.stderr)

    def test_a_message_too_large_is_explained_in_message_bytes(self):
        result = self.run_cli('send', self.bob['pubkey'], '-', input='x' * 61440)
        self.assertEqual(result.returncode, USAGE)
        self.assertEqual(result.stderr.strip(), "send failed: message too large: 61,440 bytes; "
                                                "this mesh's broker takes at most about 48,800")
        fits = self.run_cli('send', self.bob['pubkey'], '-', input='x' * 48800)
        self.assertEqual(fits.returncode, 0, fits.stderr)

    def test_joining_a_mesh_already_joined_says_so_without_spending_the_invite(self):
        link = admin.invite(self.broker.store, 'team', self.broker.url)['link']
        result = self.run_cli('join', link, home=self.db.home)
        self.assertEqual(result.returncode, RUNTIME)
        self.assertIn('already joined mesh "team"', result.stderr)
        fresh = short_tempdir()
        self.addCleanup(shutil.rmtree, fresh, True)
        joined = self.run_cli('join', link, home=fresh)     # the invite was not spent
        self.assertEqual(joined.returncode, 0, joined.stderr)

    def test_call_reads_params_from_stdin_and_whoami_names_this_member(self):
        result = self.run_cli('call', 'inbox.list', '-', input='{"limit": 1}')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)['items'], [])
        who = self.run_cli('whoami')
        self.assertEqual(who.returncode, 0, who.stderr)
        self.assertIn('on mesh team · member key %s' % self.alice['pubkey'], who.stdout)


class ClosedStdoutTest(LinksTestCase):

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.da = self.daemon([self.alice])
        self.db = self.daemon([self.bob], home=self.home)
        for number in range(40):
            self.da.call('send', {'to': self.bob['pubkey'], 'message': '%02d %s' % (number,
                                                                                     'x' * 2000)})
        self.wait_inbox(self.db, 40)

    def unread(self):
        return len(self.db.call('inbox.list', {'unread_only': True, 'limit': 1000})['items'])

    def test_a_reader_that_goes_away_ends_it_quietly_and_marks_nothing(self):
        shell = subprocess.run(
            ['sh', '-c', '"$0" "$1" inbox --json | head -c 100 >/dev/null',
             sys.executable, ENTRY], capture_output=True, text=True, env=meshd_env(self.home),
            cwd=ROOT, timeout=DEADLINE)
        self.assertNotIn('Traceback', shell.stderr)
        self.assertNotIn('BrokenPipe', shell.stderr)
        self.assertEqual(shell.stderr, '')
        self.assertEqual(self.unread(), 40)       # 80 KiB it never printed are still unread

    def test_peek_leaves_every_row_unread_and_a_plain_listing_marks_them(self):
        peek = self.run_cli('inbox', '--peek')
        self.assertEqual(peek.returncode, 0, peek.stderr)
        self.assertEqual(peek.stdout.count('direct message from '), 40)
        self.assertEqual(self.unread(), 40)
        listed = self.run_cli('inbox')
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertEqual(self.unread(), 0)


class NoDaemonTest(LinksTestCase):

    def test_no_spawn_is_accepted_everywhere_and_the_hint_names_what_exists(self):
        for verb in (['send', 'bob', 'hi'], ['inbox'], ['outbox'], ['peers'], ['sessions'],
                     ['whoami'], ['call', 'daemon.health']):
            result = self.run_cli(*(verb[:1] + ['--no-spawn'] + verb[1:]))
            self.assertEqual(result.returncode, RUNTIME, (verb, result.stderr))
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
            self.assertIn('start it with `', result.stderr)
            self.assertFalse(os.path.exists(os.path.join(self.home, 'daemon', 'daemon.log')))


class OptionsTest(LinksTestCase):

    def test_short_options_are_the_same_on_every_argh(self):
        from meshd.cli import build_parser
        parser = build_parser()
        args = parser.parse_args(['send', '-m', 'team', '-p', 'now', '-j', '*', 'hi'])
        self.assertEqual((args.mesh, args.priority, args.json), ('team', 'now', True))
        self.assertEqual(parser.parse_args(['inbox', '-m', 'team', '-j']).mesh, 'team')
        self.assertEqual(parser.parse_args(['peers', '-a']).all, True)

    def test_help_has_no_default_noise_and_every_command_a_summary(self):
        top = self.run_cli('--help').stdout
        for command in ('daemon', 'broker-admin', 'send', 'completion', 'whoami'):
            line = next(l for l in top.splitlines() if l.strip().startswith(command + ' '))
            self.assertGreater(len(line.split()), 1, line)
        for command in (['send'], ['broker'], ['daemon', 'up'], ['broker-admin', 'invite']):
            text = self.run_cli(*(command + ['--help'])).stdout
            self.assertNotIn('(default: ', text, command)

    def test_completion_scripts_come_from_the_parser(self):
        bash = self.run_cli('completion', 'bash')
        self.assertEqual(bash.returncode, 0, bash.stderr)
        self.assertIn('complete -F _meshd meshd', bash.stdout)
        words = subprocess.run(
            ['bash', '-c', 'source /dev/stdin; COMP_WORDS=(meshd daemon ""); COMP_CWORD=2; '
             '_meshd; echo "${COMPREPLY[@]}"'], input=bash.stdout, capture_output=True,
            text=True, timeout=DEADLINE).stdout.split()
        self.assertEqual(sorted(w for w in words if not w.startswith('-')),
                         ['accept-host', 'down', 'install-service', 'status', 'up'])
        self.assertTrue(self.run_cli('completion', 'zsh').stdout.startswith('#compdef meshd'))
