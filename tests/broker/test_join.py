"""HTTP routes, POST /join, broker-admin and the meshd.invite client (spec/wire.md §9, §11.7–§11.8)."""
import io
import json
import os
import stat
import sys
import time
import unittest
from unittest import mock

from meshd import cli as meshd_cli, clock
from meshd import crypto, invite as client
from meshd.broker import admin, cli, store as broker_store
from meshd.broker.models import Invite, Member as MemberRow
from meshd.exceptions import InviteError
from tests.base import Member
from tests.broker.base import BrokerTestMixin, hello_frame
from tests.vectors import V1_TOKEN

OWNER_SEED_PK = '6e7a1cdd29b0b78fd13af4c5598feff4ef2a97166e3ca6f2e4fbfccd80505bf1'
V1_TOKEN_PREFIX = 'eyJ2IjoxLCJtZXNoX2lkIjoibWVzaC10ZXN0Ii'


class HttpMixin(BrokerTestMixin):
    broker_kwargs = {'dm_ttl': '2d'}

    def test_health(self):
        status, body, headers = self.http_get('/health?x=1')
        self.assertEqual(status, 200)
        self.assertEqual(headers['Access-Control-Allow-Origin'], '*')
        data = json.loads(body)
        self.assertEqual(list(data), ['status', 'db', 'version', 'gitSha', 'uptime', 'dmTtlSeconds'])
        self.assertEqual((data['status'], data['db'], data['dmTtlSeconds']), ('ok', 'up', 172800))
        status, body, _ = self.http_get('/health/ready')
        self.assertEqual((status, json.loads(body)['status']), (200, 'ready'))

    def test_unknown_route_and_v2_claim(self):
        import urllib.error
        with self.assertRaises(urllib.error.HTTPError) as ctx:
            self.http_get('/metrics')
        self.assertEqual((ctx.exception.code, ctx.exception.read()), (404, b'not found'))
        self.assertEqual(self.http_post('/invites/abc/claim', {}), (501, {'error': 'invite_v2_disabled'}))

    def mint(self, **kw):
        with self.broker.store.connection():
            return admin.invite(self.broker.store, self.mesh_slug,
                                'ws://127.0.0.1:%d/ws' % self.broker.port, **kw)

    def join_body(self, minted, pubkey=None, name='joiner'):
        payload = json.loads(crypto.b64url_decode(minted['token']))
        return {'invite_token': minted['token'], 'invite_payload': payload,
                'peer_pubkey': pubkey or crypto.generate_keypair()[0], 'display_name': name}

    def test_join_errors_in_order(self):
        minted = self.mint(max_uses=1, name='preset-name', groups='eng:lead')
        self.assertEqual(self.http_post('/join', {}), (400, {
            'ok': False, 'error': 'invite_token, invite_payload, peer_pubkey, display_name required'}))
        body = self.join_body(minted)
        self.assertEqual(self.http_post('/join', dict(body, peer_pubkey='abc'))[1]['error'],
                         'peer_pubkey must be 64 hex chars (32 bytes)')
        bad = dict(body, invite_payload=dict(body['invite_payload'], mesh_slug='other'))
        self.assertEqual(self.http_post('/join', bad)[1]['error'], 'invite_bad_signature')
        self.assertEqual(self.http_post('/join', dict(body, invite_token='nope'))[1]['error'],
                         'invite_not_found')
        status, answer = self.http_post('/join', body)
        self.assertEqual(status, 200)
        self.assertEqual(list(answer), ['ok', 'memberId'])
        with self.broker.store.connection():
            member = MemberRow.get_by_id(answer['memberId'])
        self.assertEqual((member.display_name, json.loads(member.default_groups)),
                         ('preset-name', [{'name': 'eng', 'role': 'lead'}]))
        # Same key again: alreadyMember, no use consumed; a new key: exhausted.
        self.assertEqual(self.http_post('/join', body),
                         (200, {'ok': True, 'memberId': answer['memberId'], 'alreadyMember': True}))
        self.assertEqual(self.http_post('/join', self.join_body(minted)),
                         (400, {'ok': False, 'error': 'invite_exhausted'}))

    def test_invite_code_lookup(self):
        minted = self.mint(code=True)
        status, body, _ = self.http_get('/api/public/invite-code/' + minted['code'])
        self.assertEqual((status, json.loads(body)), (200, {'found': True, 'token': minted['token']}))
        status, body, _ = self.http_get('/api/public/invite-code/nothere1')
        self.assertEqual(json.loads(body), {'found': False})

    def test_expired_invite(self):
        minted = self.mint()
        with self.broker.store.connection():
            Invite.update(expires_at=clock.utcnow()).execute()
        self.assertEqual(self.http_post('/join', self.join_body(minted))[1]['error'], 'invite_expired')

    def test_body_limit(self):
        status, answer = self.http_post('/join', b'{"x":"' + b'a' * 70000 + b'"}')
        self.assertEqual((status, answer), (413, {'ok': False, 'error': 'payload too large'}))

    def test_client_join_then_hello(self):
        """End to end: invite, meshd.invite.enroll, then the member's hello succeeds."""
        with self.broker.store.connection():
            link = admin.invite(self.broker.store, self.mesh_slug,
                                'ws://127.0.0.1:%d/ws' % self.broker.port)['link']
        parsed = client.parse_invite(link)
        self.assertEqual(parsed['mesh_id'], self.mesh_id)
        pub, sec = crypto.generate_keypair()
        entry = client.enroll(parsed, pub, 'laptop-1')
        self.assertEqual(list(entry), ['meshId', 'memberId', 'slug', 'name', 'pubkey', 'brokerUrl',
                                       'joinedAt', 'rootKey'])
        self.assertEqual((entry['meshId'], entry['slug'], entry['pubkey']),
                         (self.mesh_id, self.mesh_slug, pub))
        with self.assertRaises(InviteError) as ctx:
            client.enroll(parsed, crypto.generate_keypair()[0], 'laptop-2')
        self.assertEqual(str(ctx.exception), 'broker refused the invite: invite_exhausted')
        peer = self.connect()
        peer.send(hello_frame(Member.from_entry(dict(entry, secretKey=sec), 'laptop-1')))
        self.assertEqual(peer.expect('hello_ack')['memberDisplayName'], 'laptop-1')


class ParseInviteTest(unittest.TestCase):
    """meshd.invite.parse_invite: link forms and client checks, no broker needed."""

    def mint(self, expires_at=None, url='ws://localhost:7900/ws'):
        pub, sec = crypto.keypair_from_seed(b'\x05' * 32)
        payload, token = crypto.mint_invite_v1('mesh-test', 'test-mesh', url,
                                               expires_at or int(time.time()) + 3600,
                                               'dGVzdC1tZXNoLXJvb3Qta2V5', 'member', pub, sec)
        return token

    def test_link_forms(self):
        token = self.mint()
        for link in ('ic://join/' + token, 'https://example.com/join/' + token,
                     'https://example.com/en/join/' + token, token):
            self.assertEqual(client.parse_invite(link)['mesh_slug'], 'test-mesh')

    def test_vector_token_is_expired(self):
        with self.assertRaises(InviteError) as ctx:
            client.parse_invite('ic://join/' + V1_TOKEN)
        self.assertTrue(str(ctx.exception).startswith('invite expired on 2023-11-21'))
        self.assertEqual(client.parse_invite(V1_TOKEN, now=1700000000)['broker_url'],
                         'ws://localhost:7900/ws')

    def test_malformed(self):
        for link, message in (('ic://join/!!!', 'invite token is not valid base64url JSON'),
                              ('hello', 'not an invite link (expected ic://join/<token>)'),
                              ('ABCDEFGH', 'v2 invites are not supported; ask for an ic://join/ link')):
            with self.assertRaises(InviteError) as ctx:
                client.parse_invite(link)
            self.assertEqual(str(ctx.exception), message)
        token = self.mint()
        payload = json.loads(crypto.b64url_decode(token))
        payload['role'] = 'admin'                   # tampered
        forged = crypto.b64url_nopad(json.dumps(payload).encode())
        with self.assertRaises(InviteError) as ctx:
            client.parse_invite(forged)
        self.assertEqual(str(ctx.exception), 'invite signature does not verify')

    def test_insecure_remote(self):
        self.assertTrue(client.is_insecure_remote('ws://mesh.example.com/ws'))
        self.assertTrue(client.is_insecure_remote('ws://10.0.0.5:7900/ws'))
        for url in ('ws://localhost:7900/ws', 'ws://127.0.0.1:7900/ws', 'ws://[::1]:7900/ws',
                    'wss://mesh.example.com/ws'):
            self.assertFalse(client.is_insecure_remote(url), url)
        self.assertEqual(client.http_base('wss://h.example:8443/ws'), 'https://h.example:8443')


class AdminCliTest(unittest.TestCase):
    """broker-admin commands on an SQLite file: output, errors and file modes."""

    def setUp(self):
        import tempfile, shutil
        self.tmp = tempfile.mkdtemp(prefix='meshd-', dir='/tmp')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.db = os.path.join(self.tmp, 'b', 'broker.db')

    def run_cmd(self, fn, **kwargs):
        """`meshd broker-admin <fn's command> --db DB --key value…` through the CLI's main."""
        command = 'list' if fn is cli.list_meshes else fn.__name__.replace('_', '-')
        argv = ['broker-admin', command, '--db', self.db]
        for key, value in kwargs.items():
            flag = '--%s' % key.replace('_', '-')
            argv += [flag] if value is True else [flag, value]
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.object(sys, 'stdout', out), mock.patch.object(sys, 'stderr', err):
            try:
                meshd_cli.main(argv)
                status = 0
            except SystemExit as exc:
                status = exc.code
        return status, out.getvalue(), err.getvalue()

    def test_commands(self):
        pub, _ = crypto.generate_keypair()
        status, out, _ = self.run_cmd(cli.create_mesh, name='My Team!', admin_pubkey=pub)
        mesh = json.loads(out)
        self.assertEqual((status, mesh['slug'], list(mesh)),
                         (0, 'my-team', ['id', 'slug', 'name', 'owner_pubkey', 'admin_member_id']))
        self.assertEqual(stat.S_IMODE(os.stat(self.db).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.db)).st_mode), 0o700)
        status, _, err = self.run_cmd(cli.create_mesh, name='My Team!')
        self.assertEqual((status, err), (1, 'error: slug already taken: my-team\n'))
        status, out, _ = self.run_cmd(cli.invite, mesh='my-team', broker_url='ws://localhost:7900/ws')
        self.assertTrue(out.startswith('ic://join/') and out.endswith('\n'))
        status, _, err = self.run_cmd(cli.invite, mesh='my-team', broker_url='http://x/ws')
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith('error: --broker-url must be'))
        other, _ = crypto.generate_keypair()
        status, out, _ = self.run_cmd(cli.add_member, mesh='my-team', pubkey=other, name='bob')
        self.assertEqual(list(json.loads(out)), ['meshId', 'memberId', 'slug', 'name'])
        status, out, _ = self.run_cmd(cli.grant, mesh='my-team', member=other, sender=pub, caps='none')
        self.assertEqual(json.loads(out)['grants'], {pub: []})
        status, out, _ = self.run_cmd(cli.revoke_member, mesh='my-team', member=other)
        self.assertTrue(json.loads(out)['revoked'])
        status, out, _ = self.run_cmd(cli.list_meshes, mesh='my-team', json=True)
        self.assertEqual([m['revoked'] for m in json.loads(out)['members']], [False, True])
        status, out, _ = self.run_cmd(cli.list_meshes, mesh='my-team')
        table = out.splitlines()
        self.assertEqual(table[0].split(), ['name', 'role', 'key', 'state'])
        self.assertEqual([line.split()[-1] for line in table[1:]], ['active', 'revoked'])
        status, out, _ = self.run_cmd(cli.list_meshes)
        self.assertEqual(out.splitlines()[1].split()[:3], ['my-team', 'My', 'Team!'])
        status, _, err = self.run_cmd(cli.add_member, mesh='my-team', pubkey='xyz', name='x')
        self.assertEqual(err, 'error: pubkey must be 64 hex chars (32 bytes)\n')

    def test_refuses_foreign_owner(self):
        self.run_cmd(cli.create_mesh, name='x')
        with mock.patch('os.geteuid', return_value=os.geteuid() + 1):
            status, _, err = self.run_cmd(cli.list_meshes)
        self.assertEqual(status, 1)
        self.assertIn('run broker-admin as that user', err)

    def test_mint_reproduces_vector(self):

        class _Mesh(object):
            id, slug, root_key, owner_pubkey = ('mesh-test', 'test-mesh', 'dGVzdC1tZXNoLXJvb3Qta2V5',
                                                OWNER_SEED_PK)
            owner_secret_key = crypto.keypair_from_seed(b'\x05' * 32)[1]
        store = broker_store.open_store(self.db)
        try:
            from meshd.broker import invite as broker_invite
            link, token, code = broker_invite.mint(store, _Mesh, 'ws://localhost:7900/ws',
                                                   1700604800)
        finally:
            store.close()
        self.assertEqual((link, token, code), ('ic://join/' + V1_TOKEN, V1_TOKEN, None))


class HttpSqliteTest(HttpMixin, unittest.TestCase):
    backend = 'sqlite'


class HttpPostgresTest(HttpMixin, unittest.TestCase):
    backend = 'postgresql'


if __name__ == '__main__':
    unittest.main()
