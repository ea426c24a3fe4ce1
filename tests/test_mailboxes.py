"""inbox.* and outbox.* over the socket, on rows written the way inbound and send write them."""
import os
import secrets
import sqlite3
import uuid

from rpc.protocol import encode, request
from meshd.clock import now_ms
from tests.base import MeshdTestCase, make_mesh, presence_for

DAY_MS = 24 * 3600 * 1000


class MailboxTestCase(MeshdTestCase):

    def setUp(self):
        super().setUp()
        self.mesh = make_mesh('alpha')
        self.write_config([self.mesh, make_mesh('beta')])
        self.daemon = self.start_daemon()
        self.db = sqlite3.connect(os.path.join(self.home, 'daemon', 'meshd.db'), timeout=10)
        self.addCleanup(self.db.close)

    def add_inbox(self, recipient=None, kind='member', mesh='alpha', received_at=None,
                  body='hello', seen_at=None):
        row_id = str(uuid.uuid4())
        with self.db:
            self.db.execute(
                'INSERT INTO inbox (id, client_message_id, mesh, sender_pubkey, sender_name, '
                'body, received_at, seen_at, recipient_pubkey, recipient_kind) '
                'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                (row_id, str(uuid.uuid4()), mesh, 'ab' * 32, 'peer', body,
                 received_at or now_ms(), seen_at, recipient or '', kind if recipient else None))
        return row_id

    def add_outbox(self, status='pending', enqueued_at=None):
        row_id, cmid = str(uuid.uuid4()), str(uuid.uuid4())
        now = enqueued_at or now_ms()
        with self.db:
            self.db.execute(
                'INSERT INTO outbox (id, client_message_id, request_fingerprint, payload, '
                'enqueued_at, attempts, next_attempt_at, status, mesh, target_spec, nonce, '
                'ciphertext, priority, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)',
                (row_id, cmid, b'\x01' * 32, b'hi there', now, 2, now, status, 'alpha',
                 'cd' * 32, 'bm9uY2U=', 'Y3Q=', 'next', now + 7 * DAY_MS))
            self.db.execute('INSERT INTO idempotency VALUES (?, ?, ?, ?)',
                            (cmid, b'\x01' * 32, row_id, now))
        return row_id, cmid

    def session(self, mesh='alpha'):
        token = secrets.token_hex(32)
        presence = presence_for(self.mesh)
        self.daemon.call('sessions.register', {
            'token': token, 'session_id': str(uuid.uuid4()), 'mesh': mesh,
            'display_name': 'agent', 'pid': os.getpid(), 'presence': presence})
        client = self.daemon.client()
        self.addCleanup(client.close)
        client.call('session.attach', {'token': token})
        return client, presence['session_pubkey']


class InboxTest(MailboxTestCase):

    def test_list_is_newest_first_with_iso_times_and_mark_seen_only_on_request(self):
        old = self.add_inbox(received_at=now_ms() - 60000)
        new = self.add_inbox()
        items = self.daemon.call('inbox.list')['items']
        self.assertEqual([i['id'] for i in items], [new, old])
        self.assertRegex(items[0]['received_at'], r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$')
        self.assertIsNone(items[0]['seen_at'])
        self.assertEqual(self.daemon.call('inbox.list', {'unread_only': True})['marked_seen'], 0)
        answer = self.daemon.call('inbox.list', {'mark_seen': True})
        self.assertEqual(answer['marked_seen'], 2)
        self.assertIsNone(answer['items'][0]['seen_at'])  # the value before this call
        self.assertEqual(self.daemon.call('inbox.list', {'unread_only': True})['items'], [])

    def test_filters_since_from_mesh_and_limit(self):
        self.add_inbox(received_at=now_ms() - 2 * DAY_MS)
        recent = self.add_inbox(mesh='beta')
        answer = self.daemon.call('inbox.list', {'since': '2000-01-01T00:00:00.000Z',
                                                 'mesh': 'beta', 'from': 'ab' * 32})
        self.assertEqual([i['id'] for i in answer['items']], [recent])
        self.assertEqual(len(self.daemon.call('inbox.list', {'limit': 1})['items']), 1)
        with self.daemon.client() as client:
            answer = client.request('inbox.list', {'since': 'yesterday'})
        self.assertEqual(answer['error']['data']['code'], 'invalid_params')

    def test_mark_seen_keeps_the_first_timestamp(self):
        row = self.add_inbox()
        self.assertEqual(self.daemon.call('inbox.mark_seen', {'ids': [row]}), {'marked_seen': 1})
        first = self.daemon.call('inbox.list')['items'][0]['seen_at']
        self.assertEqual(self.daemon.call('inbox.mark_seen', {'ids': [row]}), {'marked_seen': 0})
        self.assertEqual(self.daemon.call('inbox.list')['items'][0]['seen_at'], first)
        with self.daemon.client() as client:
            answer = client.request('inbox.mark_seen', {})
        self.assertEqual(answer['error']['message'], "missing 'ids' (string[])")

    def test_a_session_sees_only_its_own_dms_its_member_rows_and_unscoped_rows(self):
        client, my_key = self.session()
        sibling_key = 'ef' * 32
        mine = self.add_inbox(my_key, 'session')
        member = self.add_inbox(self.mesh['pubkey'], 'member')
        legacy = self.add_inbox(None)
        sibling = self.add_inbox(sibling_key, 'session')
        other_mesh = self.add_inbox(None, mesh='beta')
        seen = {i['id'] for i in client.call('inbox.list')['items']}
        self.assertEqual(seen, {mine, member, legacy})
        # Delete and flush are scoped the same way.
        answer = client.request('inbox.delete', {'id': sibling})
        self.assertEqual(answer['error']['data']['code'], 'not_found')
        self.assertEqual(client.call('inbox.flush'), {'removed': 3})
        remaining = {i['id'] for i in self.daemon.call('inbox.list')['items']}
        self.assertEqual(remaining, {sibling, other_mesh})

    def test_flush_before_and_delete(self):
        old = self.add_inbox(received_at=now_ms() - 3 * DAY_MS)
        new = self.add_inbox()
        self.assertEqual(self.daemon.call('inbox.flush', {'before': '2000-01-01T00:00:00Z'}),
                         {'removed': 0})
        before = self.daemon.call('inbox.list')['items'][0]['received_at']
        self.assertEqual(self.daemon.call('inbox.flush', {'before': before}), {'removed': 1})
        self.assertEqual(self.daemon.call('inbox.delete', {'id': new}), {'removed': 1, 'id': new})
        self.assertEqual(self.daemon.call('inbox.list')['items'], [])
        self.assertTrue(old)


class OutboxTest(MailboxTestCase):

    def test_send_refuses_a_ttl_too_large_to_store(self):
        """A ttl of 10**12 s was queued, answered internal, and broke outbox.list."""
        with self.daemon.client() as client:
            answer = client.request('send', {'to': '*', 'message': 'x', 'mesh': 'alpha',
                                             'ttl': 10 ** 12})
        self.assertEqual(answer['error']['data']['code'], 'invalid_params')
        self.assertEqual(self.daemon.call('outbox.list')['items'], [])

    def test_pipelined_sends_are_answered_in_order_and_seen_by_the_next_request(self):
        """Sends on one connection are pipelined into shared commits; the answers still
        leave in request order, and a request of another kind waits for them."""
        def send(n, key, body):
            return encode(request(n, 'send', {'to': '*', 'message': body, 'mesh': 'alpha',
                                              'client_message_id': key}))
        lines = [send(n, 'k%d' % n, 'n%d' % n) for n in range(30)]
        lines.append(send(30, 'k3', 'another body'))    # queued behind its original
        lines.append(send(31, 'k4', 'n4'))              # the same send again
        lines.append(encode(request('list', 'outbox.list', {'limit': 100})))
        with self.daemon.client() as client:
            client.send_raw(b''.join(lines))
            answers = [client.read_message() for _ in lines]
        self.assertEqual([a['id'] for a in answers], list(range(32)) + ['list'])
        self.assertEqual([a['result']['client_message_id'] for a in answers[:30]],
                         ['k%d' % n for n in range(30)])
        self.assertEqual(answers[30]['error']['data']['code'], 'conflict')
        self.assertEqual((answers[31]['result']['client_message_id'],
                          answers[31]['result']['duplicate']), ('k4', True))
        self.assertEqual(sorted(item['client_message_id']
                                for item in answers[-1]['result']['items']),
                         sorted('k%d' % n for n in range(30)))

    def test_list_shows_rows_newest_first_with_expiry_and_filters_by_status(self):
        first, _ = self.add_outbox('pending', now_ms() - 1000)
        second, _ = self.add_outbox('dead')
        items = self.daemon.call('outbox.list')['items']
        self.assertEqual([i['id'] for i in items], [second, first])
        self.assertEqual(items[0]['payload_bytes'], len(b'hi there'))
        self.assertEqual(items[0]['target_spec'], 'cd' * 32)
        self.assertTrue(items[0]['expires_at'].endswith('Z'))
        self.assertEqual([i['id'] for i in self.daemon.call(
            'outbox.list', {'status': 'pending'})['items']], [first])
        self.assertEqual(len(self.daemon.call('outbox.list', {'status': 'bogus'})['items']), 2)

    def test_requeue_aborts_the_row_and_copies_target_and_encryption(self):
        row, _cmid = self.add_outbox('dead')
        result = self.daemon.call('outbox.requeue', {'id': row, 'new_client_message_id': 'n-1'})
        self.assertEqual(result['aborted_row_id'], row)
        self.assertEqual(result['new_client_message_id'], 'n-1')
        items = {i['id']: i for i in self.daemon.call('outbox.list')['items']}
        self.assertEqual(items[row]['status'], 'aborted')
        self.assertEqual(items[row]['superseded_by'], result['new_row_id'])
        self.assertEqual(items[row]['aborted_by'], 'operator')
        copy = items[result['new_row_id']]
        self.assertEqual((copy['status'], copy['attempts'], copy['target_spec'], copy['mesh']),
                         ('pending', 0, 'cd' * 32, 'alpha'))
        stored = self.db.execute('SELECT nonce, ciphertext, priority FROM outbox WHERE id = ?',
                                 (result['new_row_id'],)).fetchone()
        self.assertEqual(stored, ('bm9uY2U=', 'Y3Q=', 'next'))

    def test_requeue_refusals(self):
        done, _ = self.add_outbox('done')
        pending, cmid = self.add_outbox('pending')
        with self.daemon.client() as client:
            for params, reason in (({'id': done}, 'requeue_not_allowed'),
                                   ({'id': 'nope'}, 'requeue_not_allowed'),
                                   ({'id': pending, 'new_client_message_id': cmid},
                                    'client_message_id_in_use')):
                answer = client.request('outbox.requeue', params)
                self.assertEqual(answer['error']['data']['code'], 'conflict')
                self.assertEqual(answer['error']['data']['reason'], reason)
        statuses = {i['id']: i['status'] for i in self.daemon.call('outbox.list')['items']}
        self.assertEqual(statuses, {done: 'done', pending: 'pending'})

    def test_inflight_rows_left_by_a_crash_are_pending_after_restart(self):
        row, _ = self.add_outbox('inflight')
        self.daemon.stop()
        self.daemon = self.start_daemon()
        items = self.daemon.call('outbox.list')['items']
        self.assertEqual((items[0]['id'], items[0]['status'], items[0]['attempts']),
                         (row, 'pending', 2))
        self.daemon.wait_for_log('outbox_inflight_recovered')
