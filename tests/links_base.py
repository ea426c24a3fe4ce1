"""Fixtures for end-to-end tests: a real meshd broker, real daemon processes, real sessions.

The broker runs in the test process (nose2 runs patched, so it serves while the test waits);
daemons are `meshd daemon up --foreground` processes joined to it with member keys enrolled
through the broker's admin functions. Timings are shortened through MESHD_TEST_TIMINGS.
"""
import os
import secrets
import shutil
import subprocess
import time
import uuid

from meshd import crypto
from tests.base import (MeshdTestCase, create_mesh, enrol, short_tempdir, start_broker,
                        wait_for)

DAEMON_TIMINGS = {'link_backoff_scale': 0.05, 'drain_poll': 0.2, 'link_hello_timeout': 5.0,
                  'clock_check_interval': 0.5}
BROKER_TIMINGS = {'broker_ping': 600.0, 'broker_pong_timeout': 600.0, 'broker_grace': 60.0,
                  'broker_lease': 30.0, 'broker_sweep': 0.5, 'broker_ttl_sweep': 600.0}


class LinksTestCase(MeshdTestCase):
    """One broker with mesh `team`; helpers to add members, daemons and sessions."""

    broker_timings = {}
    broker_kwargs = {}

    def setUp(self):
        super().setUp()
        self.broker_dir = short_tempdir()
        self.addCleanup(shutil.rmtree, self.broker_dir, True)
        self.broker_db = os.path.join(self.broker_dir, 'broker.db')
        self.broker = None
        self.start_broker(port=0)
        self.mesh = create_mesh(self.broker.store, 'Team', slug='team')

    def start_broker(self, port):
        timings = dict(BROKER_TIMINGS, **self.broker_timings)
        self.broker = start_broker(self, self.broker_db, port=port, timings=timings,
                                   **self.broker_kwargs)
        return self.broker

    def restart_broker(self):
        port = self.broker.port
        self.broker.stop()
        return self.start_broker(port)

    # -- members and daemons -----------------------------------------------------------

    def member(self, name, mesh=None, role='member', broker_url=None):
        """Enroll a member key; return its config.json entry."""
        member = enrol(self.broker.store, mesh or self.mesh, name, role=role)
        return member.entry(broker_url or self.broker.url)

    def daemon(self, entries, home=None, timings=None, wait_open=True):
        """A daemon process with its own home and these mesh entries."""
        home = home or short_tempdir()
        if home != self.home:
            self.addCleanup(shutil.rmtree, home, True)
        self.write_config(list(entries), home=home)
        daemon = self.start_daemon(home=home, timings=dict(DAEMON_TIMINGS, **(timings or {})))
        if wait_open:
            for entry in entries:
                self.wait_link(daemon, entry['slug'])
        return daemon

    def wait_link(self, daemon, slug, status='open'):
        return wait_for(lambda: daemon.call('daemon.health')['brokers'].get(slug, {}).get(
            'status') == status, what='%s link of %s' % (slug, status))

    # -- sessions ----------------------------------------------------------------------

    def live_process(self):
        proc = subprocess.Popen(['sleep', '600'])
        self.addCleanup(lambda: (proc.poll() is None and proc.kill(), proc.wait()))
        return proc

    def session(self, daemon, entry, name, session_id=None, pid=None, wait_open=True,
                replace=False):
        """Register a session with presence; return (token, session pubkey)."""
        pub, sec = crypto.generate_keypair()
        wire = crypto.make_attestation(entry['pubkey'], entry['secretKey'], pub,
                                       int(time.time() * 1000) + 3600 * 1000)
        token = secrets.token_hex(32)
        daemon.call('sessions.register', {
            'token': token, 'session_id': session_id or str(uuid.uuid4()), 'mesh': entry['slug'],
            'display_name': name, 'pid': pid or self.live_process().pid,
            'presence': {'session_pubkey': pub, 'session_secret_key': sec,
                         'parent_attestation': {
                             'session_pubkey': pub, 'parent_member_pubkey': entry['pubkey'],
                             'expires_at': wire['expiresAt'], 'signature': wire['signature']}},
            'replace': replace})
        if wait_open:
            wait_for(lambda: daemon.call('daemon.health')['sessions'].get(token[:8], {}).get(
                'status') == 'open', what='session link of %s' % name)
        return token, pub

    def attached(self, daemon, token):
        client = daemon.client()
        self.addCleanup(client.close)
        client.call('session.attach', {'token': token})
        return client

    # -- mailboxes ---------------------------------------------------------------------

    def inbox(self, daemon, client=None, **params):
        if client is not None:
            return client.call('inbox.list', params)['items']
        return daemon.call('inbox.list', params)['items']

    def wait_inbox(self, daemon, count, client=None, **params):
        return wait_for(lambda: (lambda items: items if len(items) >= count else None)(
            self.inbox(daemon, client, **params)), what='%d inbox rows' % count)

    def wait_outbox(self, daemon, status, count=1):
        return wait_for(lambda: (lambda rows: rows if len(rows) >= count else None)(
            daemon.call('outbox.list', {'status': status})['items']),
            what='%d %s outbox rows' % (count, status))
