"""The broker as a process and its store: SIGTERM closes sockets with 1001 and exits 0 (§7.6);
migrations are numbered and refuse a newer schema (§11.5)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import peewee

from meshd.broker import migrations, store as broker_store
from meshd.exceptions import StorageError
from storage import migrate
from tests.base import DEADLINE, create_mesh, enrol, start_broker
from tests.broker.base import Peer, hello_frame

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = ('from gevent import monkey; monkey.patch_all()\n'
          'import logging, sys, argh\n'
          'logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n'
          'from meshd.broker.cli import broker\n'
          'argh.dispatch_command(broker)\n')


class SigtermTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='meshd-', dir='/tmp')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.db = os.path.join(self.tmp, 'broker.db')
        store = broker_store.open_store(self.db)
        try:
            self.ident = enrol(store, create_mesh(store, 'proc'), 'alice')
        finally:
            store.close()

    def test_sigterm_closes_1001_and_exits_0(self):
        env = dict(os.environ, PYTHONPATH=ROOT)
        env.pop('MESHD_TEST_TIMINGS', None)
        proc = subprocess.Popen([sys.executable, '-c', SCRIPT, '--listen', '127.0.0.1:0',
                                 '--db', self.db], cwd=self.tmp, env=env,
                                stderr=subprocess.PIPE, universal_newlines=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        port = None
        end = time.monotonic() + DEADLINE
        while port is None and time.monotonic() < end:
            line = proc.stderr.readline()
            if not line:
                break
            match = re.search(r'listening on 127\.0\.0\.1:(\d+)', line)
            if match:
                port = int(match.group(1))
        self.assertIsNotNone(port, 'broker did not report its port')
        peer = Peer('ws://127.0.0.1:%d/ws' % port)
        self.addCleanup(peer.close)
        peer.send(hello_frame(self.ident))
        peer.expect('hello_ack')
        proc.send_signal(signal.SIGTERM)
        closed = peer.expect_close()
        self.assertEqual((closed.code, closed.reason), (1001, 'shutting down'))
        self.assertEqual(proc.wait(timeout=DEADLINE), 0)
        proc.stderr.close()


class SingleInstanceTest(unittest.TestCase):

    def test_second_broker_on_the_same_database_is_refused(self):
        from meshd.broker.server import BrokerServer
        first = start_broker(self)
        second = BrokerServer(listen='127.0.0.1:0', db=first.db_url)
        with self.assertRaises(StorageError) as ctx:
            second.start()
        self.assertIn('another meshd broker is using', str(ctx.exception))
        first.stop()
        third = BrokerServer(listen='127.0.0.1:0', db=first.db_url)
        third.start()
        third.stop()


class MigrationTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='meshd-', dir='/tmp')
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def columns(self, db):
        return {t: sorted(c.name for c in db.get_columns(t)) for t in sorted(db.get_tables())}

    def test_migrating_gives_the_models_schema(self):
        store = broker_store.open_store(os.path.join(self.tmp, 'a.db'))
        self.assertEqual(migrate.schema_version(store), migrations.HEAD)
        with store.connection() as db:
            got = self.columns(db)
        store.close()
        fresh = peewee.SqliteDatabase(os.path.join(self.tmp, 'b.db'))
        with fresh.bind_ctx(broker_store.MODELS):
            fresh.create_tables(broker_store.MODELS)
            expected = self.columns(fresh)
        fresh.close()
        self.assertEqual(got, expected)

    def test_newer_schema_is_refused(self):
        path = os.path.join(self.tmp, 'c.db')
        store = broker_store.open_store(path)
        with store.connection() as db:
            db.execute_sql('PRAGMA user_version = %d' % (migrations.HEAD + 1))
        store.close()
        with self.assertRaises(StorageError) as ctx:
            broker_store.open_store(path)
        self.assertIn('newer than this meshd', str(ctx.exception))

    def test_file_modes(self):
        path = os.path.join(self.tmp, 'sub', 'broker.db')
        broker_store.open_store(path).close()
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o700)


if __name__ == '__main__':
    unittest.main()
