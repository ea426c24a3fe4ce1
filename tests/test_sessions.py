"""Session registry over the real socket: register, attach, scope, reaper, rehydration, keys."""
import json
import os
import secrets
import signal
import subprocess
import uuid

from meshd import crypto, keystore
from meshd.paths import Paths
from tests.base import MeshdTestCase, make_mesh, presence_for, wait_for


class SessionsTestCase(MeshdTestCase):

    def setUp(self):
        super().setUp()
        self.mesh = make_mesh('alpha')
        self.write_config([self.mesh])

    def live_process(self):
        """A process standing in for a `meshd launch`: alive until the test kills it."""
        proc = subprocess.Popen(['sleep', '600'])
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.wait()))
        return proc

    def register(self, daemon, pid, presence=True, **extra):
        """Register a session; `presence` is True (a valid one), False (none) or a dict."""
        token = secrets.token_hex(32)
        params = {'token': token, 'session_id': str(uuid.uuid4()), 'mesh': 'alpha',
                  'display_name': 'agent-%s' % token[:4], 'pid': pid}
        if presence is True:
            params['presence'] = presence_for(self.mesh)
        elif presence:
            params['presence'] = presence
        params.update(extra)
        return token, params, daemon.call('sessions.register', params)


class RegistryTest(SessionsTestCase):

    def test_register_list_and_me_never_return_a_secret_key(self):
        daemon = self.start_daemon()
        proc = self.live_process()
        token, params, result = self.register(daemon, proc.pid, cwd='/tmp', role='dev',
                                              groups=['@ops:lead'])
        self.assertTrue(result['ok'])
        self.assertTrue(result['presence_accepted'])
        listed = daemon.call('sessions.list')['sessions']
        self.assertEqual(len(listed), 1)
        self.assertEqual(listed[0]['token_prefix'], token[:8])
        self.assertEqual(listed[0]['groups'], ['@ops:lead'])
        self.assertEqual(listed[0]['presence']['session_pubkey'],
                         params['presence']['session_pubkey'])
        with daemon.client() as client:
            attached = client.call('session.attach', {'token': token})
            self.assertEqual(attached['session_id'], params['session_id'])
            self.assertTrue(attached['presence'])
            me = client.call('sessions.me')['session']
        self.assertEqual(me['display_name'], params['display_name'])
        secret = params['presence']['session_secret_key']
        for answer in (listed, me):
            self.assertNotIn(secret, json.dumps(answer))
            self.assertNotIn('session_secret_key', json.dumps(answer))
        # The persisted row holds the binding but never the secret key.
        with open(os.path.join(self.home, 'daemon', 'meshd.db'), 'rb') as handle:
            self.assertNotIn(secret.encode(), handle.read())

    def test_malformed_presence_is_dropped_with_a_warning_not_rejected(self):
        daemon = self.start_daemon()
        bad = presence_for(self.mesh)
        bad['session_secret_key'] = crypto.generate_keypair()[1]  # not the pubkey's secret
        _token, _params, result = self.register(daemon, self.live_process().pid, presence=bad)
        self.assertTrue(result['ok'])
        self.assertFalse(result['presence_accepted'])
        daemon.wait_for_log('session_register_presence_malformed')

    def test_register_validation_messages(self):
        daemon = self.start_daemon()
        with daemon.client() as client:
            answer = client.request('sessions.register', {'token': 'abc'})
            self.assertEqual(answer['error']['message'], 'token must be 64 hex chars')
            answer = client.request('sessions.register', {'token': 'a' * 64})
            self.assertEqual(answer['error']['message'],
                             'session_id, mesh, display_name, pid all required')
            self.assertEqual(answer['error']['data']['code'], 'invalid_params')

    def test_sessions_me_needs_an_attached_session_and_unknown_tokens_are_refused(self):
        daemon = self.start_daemon()
        with daemon.client() as client:
            answer = client.request('sessions.me')
            self.assertEqual(answer['error']['data']['code'], 'no_session')
            answer = client.request('session.attach', {'token': 'f' * 64})
            self.assertEqual(answer['error']['data']['code'], 'no_session')
            self.assertEqual(answer['error']['code'], -32001)

    def test_deregister_then_attached_connection_is_session_less(self):
        daemon = self.start_daemon()
        token, _params, _result = self.register(daemon, self.live_process().pid)
        with daemon.client() as client:
            client.call('session.attach', {'token': token})
            self.assertEqual(daemon.call('sessions.deregister', {'token': token}),
                             {'ok': True, 'token_prefix': token[:8]})
            answer = client.request('sessions.me')
            self.assertEqual(answer['error']['data']['code'], 'no_session')
        with daemon.client() as client:
            answer = client.request('sessions.deregister', {'token': token})
        self.assertEqual(answer['error']['data'], {'code': 'session_not_found',
                                                   'token_prefix': token[:8]})

    def test_a_session_id_held_by_another_live_process_is_refused_unless_replace(self):
        """Finding 9: registering the same session id again silently evicted the first
        session: its token stopped working and its key file was overwritten."""
        daemon = self.start_daemon()
        first, params, _ = self.register(daemon, self.live_process().pid)
        key_file = Paths(self.home).session_keypair('alpha', params['session_id'])
        with open(key_file) as handle:
            kept_key = handle.read()
        other_pid = self.live_process().pid
        second = secrets.token_hex(32)
        with daemon.client() as client:
            answer = client.request('sessions.register', dict(
                params, token=second, pid=other_pid, presence=presence_for(self.mesh)))
        self.assertEqual(answer['error']['data']['code'], 'session_exists', answer)
        self.assertEqual(answer['error']['data']['pid'], params['pid'])
        with open(key_file) as handle:
            self.assertEqual(handle.read(), kept_key)
        self.assertEqual([s['token_prefix'] for s in daemon.call('sessions.list')['sessions']],
                         [first[:8]])
        daemon.call('sessions.register', dict(params, token=second, pid=other_pid,
                                              replace=True))
        self.assertEqual([s['token_prefix'] for s in daemon.call('sessions.list')['sessions']],
                         [second[:8]])

    def test_a_pid_that_is_no_process_id_is_invalid_params(self):
        """Fuzzing: pid 10^30 was accepted; every reaper pass then failed on it, and a
        second registration of its session id answered -32603."""
        daemon = self.start_daemon()
        with daemon.client() as client:
            for pid in (10 ** 30, 2 ** 31, -1):
                answer = client.request('sessions.register', {
                    'token': secrets.token_hex(32), 'session_id': 's', 'mesh': 'alpha',
                    'display_name': 'x', 'pid': pid})
                self.assertEqual(answer['error']['data']['code'], 'invalid_params', answer)
        self.assertEqual(daemon.call('sessions.list')['sessions'], [])

    def test_launch_resume_takes_over_a_session_a_live_process_holds(self):
        daemon = self.start_daemon()
        first, params, _ = self.register(daemon, self.live_process().pid)
        done = self.run_cli('launch', '--resume', params['session_id'], '--', 'true')
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn(first[:8], [s['token_prefix']
                                     for s in daemon.call('sessions.list')['sessions']])

    def test_same_session_id_registered_again_replaces_the_old_token(self):
        daemon = self.start_daemon()
        pid = self.live_process().pid
        first, params, _ = self.register(daemon, pid)
        second = secrets.token_hex(32)
        daemon.call('sessions.register', dict(params, token=second))
        tokens = [s['token_prefix'] for s in daemon.call('sessions.list')['sessions']]
        self.assertEqual(tokens, [second[:8]])


class ReaperTest(SessionsTestCase):

    def test_reaper_deregisters_a_killed_session_process(self):
        daemon = self.start_daemon()
        proc = self.live_process()
        keep = self.live_process()
        token, _params, _ = self.register(daemon, proc.pid)
        kept, _params, _ = self.register(daemon, keep.pid)
        proc.kill()
        proc.wait()
        wait_for(lambda: [s['token_prefix'] for s in daemon.call('sessions.list')['sessions']]
                 == [kept[:8]], what='the reaper to drop the dead session')
        line = daemon.wait_for_log('session_reaped')[0]
        self.assertEqual(line['token'], token[:8])


class RehydrationTest(SessionsTestCase):

    def test_sigkill_then_restart_rehydrates_live_sessions_with_the_same_keys(self):
        daemon = self.start_daemon()
        alive = self.live_process()
        dying = self.live_process()
        session_id = str(uuid.uuid4())
        token, _params, _ = self.register(daemon, alive.pid, session_id=session_id,
                                          presence=False)
        self.register(daemon, dying.pid)
        daemon.stop(signal.SIGKILL)
        dying.kill()
        dying.wait()
        daemon = self.start_daemon()
        sessions = daemon.call('sessions.list')['sessions']
        self.assertEqual([s['token_prefix'] for s in sessions], [token[:8]])
        revived = sessions[0]
        self.assertEqual(revived['session_id'], session_id)
        # Rehydration gives the session a persisted keypair and a fresh attestation.
        pubkey = revived['presence']['session_pubkey']
        stored = keystore.load_or_create(Paths(self.home), 'alpha', session_id)
        self.assertEqual(pubkey, stored.public_key)
        attestation = revived['presence']['parent_attestation']
        self.assertTrue(crypto.verify_hex(
            self.mesh['pubkey'],
            crypto.attestation_text(self.mesh['pubkey'], pubkey, attestation['expires_at']),
            attestation['signature']))
        line = daemon.wait_for_log('sessions_rehydrated')[0]
        self.assertEqual((line['revived'], line['persisted']), (1, 2))
        # A second restart revives the same session with the same key.
        daemon.stop()
        daemon = self.start_daemon()
        again = daemon.call('sessions.list')['sessions']
        self.assertEqual(again[0]['presence']['session_pubkey'], pubkey)

    def test_clean_shutdown_keeps_bindings(self):
        daemon = self.start_daemon()
        token, _params, _ = self.register(daemon, self.live_process().pid)
        self.assertEqual(daemon.stop(), 0)
        daemon = self.start_daemon()
        self.assertEqual([s['token_prefix'] for s in daemon.call('sessions.list')['sessions']],
                         [token[:8]])

    def test_sessions_of_a_mesh_no_longer_joined_are_not_revived(self):
        daemon = self.start_daemon()
        self.register(daemon, self.live_process().pid)
        daemon.stop()
        self.write_config([])
        daemon = self.start_daemon()
        self.assertEqual(daemon.call('sessions.list')['sessions'], [])


class KeystoreTest(MeshdTestCase):

    def test_keypair_is_persisted_private_and_reused(self):
        paths = Paths(self.home)
        session_id = str(uuid.uuid4())
        first = keystore.load_or_create(paths, 'alpha', session_id)
        self.assertTrue(first.persisted)
        path = paths.session_keypair('alpha', session_id)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o700)
        self.assertEqual(keystore.load_or_create(paths, 'alpha', session_id).public_key,
                         first.public_key)
        record = json.load(open(path))
        self.assertEqual(sorted(record), ['createdAt', 'meshSlug', 'publicKey', 'secretKey',
                                          'sessionId', 'version'])

    def test_invalid_identifiers_get_an_ephemeral_key_and_write_nothing(self):
        paths = Paths(self.home)
        for mesh, session_id in (('../evil', str(uuid.uuid4())), ('alpha', '../../x'),
                                 ('..', str(uuid.uuid4())), ('alpha', 'not-a-uuid')):
            pair = keystore.load_or_create(paths, mesh, session_id)
            self.assertFalse(pair.persisted)
        self.assertFalse(os.path.exists(paths.sessions_dir))

    def test_corrupt_keypair_file_is_rewritten(self):
        paths = Paths(self.home)
        session_id = str(uuid.uuid4())
        first = keystore.load_or_create(paths, 'alpha', session_id)
        with open(paths.session_keypair('alpha', session_id), 'w') as handle:
            handle.write('{"publicKey": "zz"}')
        second = keystore.load_or_create(paths, 'alpha', session_id)
        self.assertTrue(second.persisted)
        self.assertNotEqual(second.public_key, first.public_key)
        self.assertEqual(keystore.load_or_create(paths, 'alpha', session_id).public_key,
                         second.public_key)


class ReaperLoadTest(SessionsTestCase):

    def test_two_hundred_sessions_never_stall_the_api_and_never_fork(self):
        """One `ps` per session every 5 s stalled claudemesh's IPC (field lesson 16)."""
        daemon = self.start_daemon(timings={'reaper_interval': 0.05})
        proc = self.live_process()
        with daemon.client() as client:
            for n in range(200):
                client.call('sessions.register', {
                    'token': secrets.token_hex(32), 'session_id': str(uuid.uuid4()),
                    'mesh': 'alpha', 'display_name': 'agent-%d' % n, 'pid': proc.pid})
            for _ in range(100):  # sweeps run every 50 ms meanwhile
                self.assertEqual(client.call('daemon.version', timeout=5)['ipc_api'], 'v1')
        children = [c for c in __import__('psutil').Process(daemon.pid).children()]
        self.assertEqual(children, [])
        self.assertEqual(len(daemon.call('sessions.list')['sessions']), 200)
