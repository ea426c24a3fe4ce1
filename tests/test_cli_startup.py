"""How a command starts: verbs that only talk to the daemon skip gevent, peewee and psutil
(issue: `meshd send` within 0.15 s); commands that run greenlets are patched first
(meshd/entry.py). A process shows what it imported through MESHD_DEBUG_MODULES, which
meshd/entry.py writes at exit."""
import argparse
import json
import os
import shutil
import subprocess
import sys

from meshd import entry
from tests.base import DEADLINE, ROOT, MeshdTestCase, short_tempdir
from tests.links_base import LinksTestCase

HEAVY = ('gevent', 'peewee', 'psutil')


def subparsers(parser):
    return next(action for action in parser._actions
                if isinstance(action, argparse._SubParsersAction)).choices


class ModulesMixin:

    def modules_of(self, *args, home=None, env=None):
        """(the CompletedProcess of `meshd ARGS`, the modules it had imported at exit)."""
        out_dir = short_tempdir()
        self.addCleanup(shutil.rmtree, out_dir, True)
        path = os.path.join(out_dir, 'modules')
        result = self.run_cli(*args, home=home,
                              env=dict(env or {}, MESHD_DEBUG_MODULES=path))
        with open(path) as handle:
            return result, set(handle.read().split())

    def assertLight(self, modules, allowed=()):
        heavy = sorted(name for name in modules
                       if name.split('.')[0] in HEAVY and name.split('.')[0] not in allowed)
        self.assertEqual(heavy, [])


class ClientVerbsTest(ModulesMixin, LinksTestCase):
    """send, inbox, peers and a group verb against real daemons joined to a real broker."""

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.da = self.daemon([self.alice], home=self.home)
        self.db = self.daemon([self.bob])

    def test_verbs_that_talk_to_the_daemon_import_no_gevent_peewee_or_psutil(self):
        result, modules = self.modules_of('send', 'bob', 'hi', '--json')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(json.loads(result.stdout)['ok'])
        self.assertLight(modules)
        self.assertNotIn('meshd.broker.cli', modules)
        self.assertNotIn('importlib.metadata', modules)
        self.assertEqual(self.wait_inbox(self.db, 1)[0]['body'], 'hi')
        for args, home in ((['inbox', '--json'], self.db.home), (['peers'], self.home),
                           (['state', 'list', '--json'], self.home),
                           (['daemon', 'status'], self.home)):
            result, modules = self.modules_of(*args, home=home)
            self.assertEqual(result.returncode, 0, (args, result.stderr))
            # `daemon status` finds the daemon through its pid file, with psutil.
            self.assertLight(modules, allowed=('psutil',) if args[0] == 'daemon' else ())
        self.assertIn('peers on team', self.run_cli('peers').stdout)

    def test_an_error_answer_is_the_same_one_line_and_exit_code(self):
        result, modules = self.modules_of('send', 'nobody', 'hi')
        self.assertEqual(result.returncode, 1)
        self.assertIn('No peer matches "nobody"', result.stderr)
        self.assertLight(modules)


class GreenletCommandsTest(ModulesMixin, MeshdTestCase):

    def tearDown(self):
        self.run_cli('daemon', 'down')

    def test_a_verb_starts_the_daemon_without_gevent_in_its_own_process(self):
        result, modules = self.modules_of('inbox', '--json')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('daemon started automatically', result.stderr)
        self.assertLight(modules, allowed=('psutil',))   # control.py: only to start one

    def test_the_daemon_in_the_foreground_is_patched_before_it_runs(self):
        path = os.path.join(self.home, 'modules')
        daemon = self.start_daemon(env={'MESHD_DEBUG_MODULES': path})
        self.assertEqual(daemon.call('daemon.version')['ipc_api'], 'v1')  # it checks the patch
        self.assertEqual(daemon.stop(), 0)
        with open(path) as handle:
            self.assertIn('gevent.monkey', handle.read().split())

    def test_detached_up_and_down_run_without_gevent(self):
        result, modules = self.modules_of('daemon', 'up', '--json')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(json.loads(result.stdout)['ok'])
        self.assertLight(modules, allowed=('psutil',))
        result, modules = self.modules_of('daemon', 'down')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertLight(modules, allowed=('psutil',))


class EntryTest(MeshdTestCase):

    def test_only_commands_that_run_no_greenlets_skip_the_patch(self):
        for args in (['send', 'bob', 'hi'], ['inbox'], ['peers', '--json'], ['state', 'get', 'k'],
                     ['skill', 'list'], ['grants', 'list'], ['msg-status', 'x'],
                     ['daemon', 'status'], ['daemon', 'down'], ['daemon', 'up', '--json'],
                     ['daemon', 'up', '--tcp-port', '7901', '--durability', 'full']):
            self.assertFalse(entry.runs_greenlets(args), args)
        for args in ([], ['--help'], ['--version'], ['broker'], ['broker-admin', 'invite'],
                     ['mcp'], ['launch', 'x'], ['quickstart'], ['join', 'ic://x'],
                     ['completion', 'bash'], ['daemon'], ['daemon', 'accept-host'],
                     ['daemon', 'up', '--foreground'], ['daemon', 'up', '--fore'],
                     ['daemon', 'up', '-f'], ['daemon', 'up', '-jf'],
                     ['daemon', 'up', '--foreground=1'], ['bogus'], ['-h', 'send']):
            self.assertTrue(entry.runs_greenlets(args), args)

    def test_importing_meshd_cli_decides_as_the_entry_point_does(self):
        # A console script written as `meshd.cli:main` (before meshd.entry:main) goes
        # straight to meshd.cli, whose first line makes the same decision.
        probe = ('import sys; sys.argv[1:] = sys.argv[1].split(); import meshd.cli; '
                 'from gevent import monkey; print(monkey.is_module_patched("socket"))')
        for words, patched in (('daemon up --foreground', 'True'), ('broker', 'True'),
                               ('mcp', 'True'), ('send bob hi', 'False')):
            result = subprocess.run([sys.executable, '-c', probe, words], cwd=ROOT,
                                    capture_output=True, text=True, timeout=DEADLINE)
            self.assertEqual(result.stdout.strip(), patched, (words, result.stderr))

    def test_the_parser_of_one_command_reads_as_in_the_whole_parser(self):
        from meshd.cli import build_parser
        whole = subparsers(build_parser())
        for name, subparser in whole.items():
            alone = subparsers(build_parser(name))
            self.assertEqual(list(alone), [name])
            self.assertEqual(alone[name].format_help(), subparser.format_help(), name)
            if any(isinstance(action, argparse._SubParsersAction)
                   for action in subparser._actions):
                for verb, inner in subparsers(subparser).items():
                    self.assertEqual(subparsers(alone[name])[verb].format_help(),
                                     inner.format_help(), (name, verb))
        self.assertEqual(list(subparsers(build_parser('no-such-command'))), list(whole))
