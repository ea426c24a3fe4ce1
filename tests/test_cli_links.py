"""The messaging CLI end to end: send, peers, launch, join errors, import, kick, quickstart."""
import json
import os
import signal
import subprocess
import sys

from tests.base import DEADLINE, ENTRY, ROOT, meshd_env, short_tempdir, wait_for
from tests.base import Member
from tests.broker.base import Peer, hello_frame
from tests.links_base import LinksTestCase


class MessagingCliTest(LinksTestCase):

    def setUp(self):
        super().setUp()
        self.alice, self.bob = self.member('alice'), self.member('bob')
        self.da = self.daemon([self.alice], home=self.home)
        self.db = self.daemon([self.bob])

    def test_send_from_stdin_and_inbox_and_peers(self):
        result = self.run_cli('send', self.bob['pubkey'], '-', '--json',
                              input='hello from stdin\n')
        self.assertEqual(result.returncode, 0, result.stderr)
        answer = json.loads(result.stdout)
        self.assertTrue(answer['ok'])
        self.assertEqual(answer['target'], self.bob['pubkey'])
        rows = self.wait_inbox(self.db, 1)
        self.assertEqual(rows[0]['body'], 'hello from stdin\n')
        inbox = self.run_cli('inbox', '--json', home=self.db.home)
        self.assertEqual(json.loads(inbox.stdout)[0]['body'], 'hello from stdin\n')
        self.assertEqual(self.inbox(self.db, unread_only=True), [])  # the listing stamped it
        peers = self.run_cli('peers', '--json', '--all')
        self.assertEqual(peers.returncode, 0, peers.stderr)
        keys = {p['pubkey'] for p in json.loads(peers.stdout)}
        self.assertEqual(keys, {self.alice['pubkey'], self.bob['pubkey']})
        # Members are peers you can message by name (DESIGN.md 17): nothing is hidden.
        plain = self.run_cli('peers')
        self.assertIn('● bob · %s… · ' % self.bob['pubkey'][:16], plain.stdout)
        self.assertIn(' · member', plain.stdout)

    def test_send_errors_are_one_clear_message_with_their_exit_code(self):
        result = self.run_cli('send', 'nobody', 'hi')
        self.assertEqual(result.returncode, 1)
        self.assertIn('No peer matches "nobody" on any joined mesh', result.stderr)
        self.assertNotIn('Traceback', result.stderr)
        result = self.run_cli('send', '#general', 'hi')
        self.assertEqual(result.returncode, 2)      # a target meshd cannot take: usage
        self.assertIn('#topics are not supported', result.stderr)

    def test_launch_runs_the_child_as_a_session_and_deregisters_it(self):
        script = ('import json, os, subprocess, sys\n'
                  'path = os.environ["MESHD_SESSION_TOKEN_FILE"]\n'
                  'token = open(path).read()\n'
                  'assert len(token) == 64 and oct(os.stat(path).st_mode)[-3:] == "600"\n'
                  'assert token not in json.dumps(dict(os.environ)) and token not in sys.argv\n'
                  'out = subprocess.run([sys.executable, %r, "call", "sessions.me"],\n'
                  '                     capture_output=True, text=True, check=True).stdout\n'
                  'me = json.loads(out)["session"]\n'
                  'print(json.dumps([me["display_name"], me["presence"]["session_pubkey"], path]))\n'
                  % ENTRY)
        result = self.run_cli('launch', '--name', 'worker', '--', sys.executable, '-c', script)
        self.assertEqual(result.returncode, 0, result.stderr)
        name, pubkey, token_file = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertEqual(name, 'worker')
        self.assertEqual(len(pubkey), 64)
        self.assertFalse(os.path.exists(token_file))
        self.assertEqual(self.da.call('sessions.list')['sessions'], [])
        self.assertIn('session "worker" on team', result.stderr)

    def test_launch_passes_the_childs_exit_status(self):
        result = self.run_cli('launch', '--', sys.executable, '-c', 'raise SystemExit(7)')
        self.assertEqual(result.returncode, 7)

    def test_join_with_a_bad_invite_is_one_line(self):
        for link in ('ic://join/not-base64!', 'hello'):
            result = self.run_cli('join', link)
            self.assertEqual(result.returncode, 2)      # not an invite: a usage error
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
            self.assertTrue(result.stderr.startswith('✘ join failed: '), result.stderr)

    def test_leave_of_an_unknown_mesh_is_exit_1(self):
        result = self.run_cli('leave', 'nope')
        self.assertEqual((result.returncode, result.stderr.strip()),
                         (1, 'not a member of mesh "nope"'))

    def test_import_claudemesh_copies_meshes_and_attaches_them(self):
        claudemesh_home = short_tempdir()
        self.addCleanup(__import__('shutil').rmtree, claudemesh_home, True)
        carol = self.member('carol')
        carol['slug'] = 'team-carol'
        path = os.path.join(claudemesh_home, 'config.json')
        with open(path, 'w') as handle:
            json.dump({'version': 1, 'meshes': [carol], 'messageMode': 'push'}, handle)
        result = self.run_cli('import-claudemesh', path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.wait_link(self.da, 'team-carol')
        missing = self.run_cli('import-claudemesh', os.path.join(claudemesh_home, 'none.json'))
        self.assertEqual(missing.returncode, 1)

    def test_kicked_session_stops_its_link_only(self):
        token, _key = self.session(self.db, self.bob, 'kick-me')
        admin_ident = self.member('boss', role='admin')
        peer = Peer(self.broker.url)
        self.addCleanup(peer.close)
        peer.send(hello_frame(Member.from_entry(admin_ident, 'boss')))
        peer.expect('hello_ack', skip=('push',))
        peer.send({'type': 'kick', 'target': 'kick-me', '_reqId': 'k1'})
        wait_for(lambda: self.db.call('daemon.health')['sessions'][token[:8]]['state'] == 'kicked',
                 what='session link kicked')
        health = self.db.call('daemon.health')
        self.assertEqual(health['sessions'][token[:8]]['status'], 'closed')
        self.assertEqual(health['brokers']['team']['status'], 'open')


class QuickstartTest(LinksTestCase):

    def test_quickstart_shows_a_dm_arriving_and_stops_everything_on_ctrl_c(self):
        home = short_tempdir()
        self.addCleanup(__import__('shutil').rmtree, home, True)
        out_path = os.path.join(home, 'quickstart.out')
        with open(out_path, 'w') as out:
            proc = subprocess.Popen([sys.executable, ENTRY, 'quickstart'], stdout=out,
                                    stderr=subprocess.STDOUT, env=meshd_env(home), cwd=ROOT)
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.wait()))
        text = wait_for(lambda: (lambda t: t if 'Press Ctrl-C' in t or proc.poll() is not None
                                 else None)(open(out_path).read()),
                        timeout=2 * DEADLINE, what='quickstart to be running')
        self.assertIn('bob received it: "hello bob, from alice"', text)
        self.assertIn('socat -t 86400 - UNIX-CONNECT:', text)
        second = self.run_cli('quickstart', home=home)       # the first one's sandbox stays
        self.assertEqual(second.returncode, 1)
        self.assertEqual(len(second.stderr.strip().splitlines()), 1, second.stderr)
        self.assertIn('another quickstart runs on %s (pid %d)' % (home, proc.pid), second.stderr)
        self.assertIsNone(proc.poll())
        pids = [int(open(os.path.join(home, 'quickstart', name, 'daemon', 'meshd.pid')).read())
                for name in ('alice', 'bob')]
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(timeout=2 * DEADLINE), 0)
        for pid in pids:
            self.assertFalse(os.path.exists('/proc/%d' % pid) and
                             'meshd' in open('/proc/%d/cmdline' % pid).read(),
                             'daemon %d still running' % pid)
