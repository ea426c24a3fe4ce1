"""events.subscribe: live stream, resume by sequence, resync after restart, half-close, filter."""
import os
import secrets
import socket
import uuid

from rpc.client import RpcClient
from rpc.protocol import encode, request

from tests.base import DEADLINE, MeshdTestCase, make_mesh, presence_for

# The meshes' brokers do not exist: after the first failed attempt, links wait quietly
# instead of publishing a broker_status event at every retry.
QUIET_LINKS = {'link_backoff_scale': 1000}


class EventsTest(MeshdTestCase):

    def setUp(self):
        super().setUp()
        self.mesh = make_mesh('alpha')
        self.other = make_mesh('beta')
        self.write_config([self.mesh, self.other])
        self.daemon = self.start_daemon(timings=QUIET_LINKS)

    def register(self, mesh='alpha', presence=None):
        token = secrets.token_hex(32)
        params = {'token': token, 'session_id': str(uuid.uuid4()), 'mesh': mesh,
                  'display_name': 'agent', 'pid': os.getpid()}
        if presence:
            params['presence'] = presence
        self.daemon.call('sessions.register', params)
        return token

    def next_event(self, client):
        """The next session event (broker_status events of the meshes' links are skipped)."""
        while True:
            message = client.next_notification(timeout=DEADLINE)
            if message.get('method') == 'event' and message['params']['kind'] == 'system':
                return message['params']

    def test_live_events_carry_seq_and_epoch_in_order(self):
        epoch = self.daemon.call('daemon.version')['epoch']
        with self.daemon.client() as client:
            answer = client.call('events.subscribe')
            self.assertEqual(answer['epoch'], epoch)
            self.assertFalse(answer['resync'])
            first = self.register()
            second = self.register()
            one, two = self.next_event(client), self.next_event(client)
        self.assertEqual((one['kind'], one['data']['token_prefix']), ('system', first[:8]))
        self.assertEqual(two['data']['token_prefix'], second[:8])
        self.assertEqual(one['epoch'], epoch)
        self.assertGreater(two['seq'], one['seq'])
        self.assertGreater(one['seq'], answer['seq'])

    def test_resume_from_since_seq_replays_missed_events_without_duplicates(self):
        with self.daemon.client() as client:
            start = client.call('events.subscribe')
            self.register()
            seen = self.next_event(client)
        missed = [self.register() for _ in range(3)]
        with self.daemon.client() as client:
            answer = client.call('events.subscribe', {'since_seq': seen['seq'],
                                                      'epoch': start['epoch']})
            self.assertEqual((answer['replayed'], answer['resync']), (3, False))
            replayed = [self.next_event(client) for _ in range(3)]
            live_token = self.register()
            live = self.next_event(client)
        self.assertEqual([e['data']['token_prefix'] for e in replayed], [t[:8] for t in missed])
        self.assertEqual(live['data']['token_prefix'], live_token[:8])
        self.assertEqual(sorted(e['seq'] for e in replayed + [live]),
                         [e['seq'] for e in replayed + [live]])

    def test_restart_answers_resync(self):
        old_epoch = self.daemon.call('daemon.version')['epoch']
        self.register()
        self.daemon.stop()
        self.daemon = self.start_daemon(timings=QUIET_LINKS)
        with self.daemon.client() as client:
            answer = client.call('events.subscribe', {'since_seq': 1, 'epoch': old_epoch})
        self.assertTrue(answer['resync'])
        self.assertEqual(answer['replayed'], 0)
        self.assertNotEqual(answer['epoch'], old_epoch)

    def test_parameter_errors(self):
        with self.daemon.client() as client:
            answer = client.request('events.subscribe', {'since_seq': 3})
            self.assertEqual(answer['error']['message'], 'since_seq requires epoch')
            client.call('events.subscribe')
            answer = client.request('events.subscribe')
            self.assertEqual(answer['error']['data']['code'], 'invalid_request')
            self.assertEqual(answer['error']['message'], 'already subscribed')

    def test_stream_continues_after_the_client_half_closes(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(DEADLINE)
        self.addCleanup(sock.close)
        sock.connect(self.daemon.socket)
        sock.sendall(encode(request(1, 'events.subscribe')))
        sock.shutdown(socket.SHUT_WR)  # what socat does when its stdin ends
        reader = sock.makefile('rb')
        self.assertIn(b'"id":1', reader.readline())
        token = self.register()
        while True:
            line = reader.readline()
            self.assertTrue(line, 'stream closed after half-close')
            if b'"method":"event"' in line:
                self.assertIn(token[:8].encode(), line)
                break

    def test_keepalives_arrive_while_idle(self):
        with self.daemon.client() as client:
            answer = client.call('events.subscribe')
            # broker_status events of the meshes' (unreachable) links may come first.
            message = client.next_notification(timeout=DEADLINE)
            while message['method'] == 'event':
                self.assertEqual(message['params']['kind'], 'broker_status')
                message = client.next_notification(timeout=DEADLINE)
        self.assertEqual(message['method'], 'keepalive')
        self.assertEqual(message['params']['epoch'], answer['epoch'])

    def test_a_session_stream_is_filtered_to_its_mesh(self):
        session = self.register('alpha', presence_for(self.mesh))
        with RpcClient(socket_path=self.daemon.socket, timeout=DEADLINE) as client:
            client.call('session.attach', {'token': session})
            client.call('events.subscribe')
            other = self.register('beta')
            mine = self.register('alpha')
            event = self.next_event(client)
        self.assertEqual(event['data']['token_prefix'], mine[:8])
        self.assertNotEqual(event['data']['token_prefix'], other[:8])
