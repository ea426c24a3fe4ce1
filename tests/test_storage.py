"""The storage layer: schema and migrations, file modes, the write lock, model helpers, pruning.

In-process, on file databases in short temp dirs (never an in-memory one, DESIGN.md 8), through the
daemon's models and a storage.Store; every test opens its own file and closes it.
"""
import os
import re
import sqlite3
import stat
import time
import uuid
from unittest import mock

import gevent
import gevent.event
from peewee import IntegrityError

from meshd.bus import EventBus
from meshd.pruner import Pruner
from storage import migrate
from storage.errors import SchemaTooNewError, StorageError
from storage.migrations import HEAD, MIGRATIONS
from storage.models import database as models_database
from storage.store import Store
from storage.models import MODELS, Event, Idempotency, Inbox, Outbox, Session
from meshd.clock import now_ms

from tests.base import DEADLINE, MeshdTestCase

DAY_MS = 24 * 3600 * 1000


def schema_of(path):
    """Tables, columns and indexes of the database at `path`, as PRAGMAs report them."""
    conn = sqlite3.connect(path)
    try:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        schema = {}
        for table in tables:
            columns = [(name, col_type.upper(), notnull, default, pk)
                       for _cid, name, col_type, notnull, default, pk
                       in conn.execute('PRAGMA table_info("%s")' % table)]
            indexes = {}
            for row in conn.execute('PRAGMA index_list("%s")' % table):
                name, unique, origin, partial = row[1], row[2], row[3], row[4]
                info = sorted(conn.execute('PRAGMA index_info("%s")' % name))
                indexes[name] = {'unique': unique, 'origin': origin, 'partial': partial,
                                 'columns': [column for _seqno, _cid, column in info]}
            schema[table] = {'columns': columns, 'indexes': indexes}
        return schema
    finally:
        conn.close()


def user_version(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute('PRAGMA user_version').fetchone()[0]
    finally:
        conn.close()


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def outbox_row(**fields):
    now = now_ms()
    row = {'id': str(uuid.uuid4()), 'client_message_id': str(uuid.uuid4()),
           'request_fingerprint': b'\x01' * 32, 'payload': b'hello', 'enqueued_at': now,
           'attempts': 0, 'next_attempt_at': now, 'status': 'pending', 'mesh': 'm',
           'target_spec': '*', 'nonce': 'bm9uY2U=', 'ciphertext': 'aGVsbG8=',
           'expires_at': now + 7 * DAY_MS}
    row.update(fields)
    return row


def inbox_row(**fields):
    row = {'id': str(uuid.uuid4()), 'client_message_id': str(uuid.uuid4()), 'mesh': 'm',
           'sender_pubkey': 'ab' * 32, 'sender_name': 'peer', 'body': 'hi',
           'received_at': now_ms(), 'recipient_pubkey': '', 'recipient_kind': None}
    row.update(fields)
    return row


class StorageTestCase(MeshdTestCase):

    def path(self, name='meshd.db'):
        return os.path.join(self.home, name)

    def open(self, path):
        self.store = Store(models_database).open_sqlite(path)
        self.addCleanup(self.store.close)
        return self.store.database

    def migrate(self):
        return migrate.migrate(self.store, MIGRATIONS, incremental_vacuum=True)

    def open_migrated(self, name='meshd.db'):
        database = self.open(self.path(name))
        self.migrate()
        return database

    def run_migrations(self, until):
        """Run migrations 1..until by hand, as an older meshd left its database."""
        with self.store.writing():
            for migration in MIGRATIONS[:until]:
                for statement in migration.sqlite:
                    self.store.database.execute_sql(statement)
            self.store.database.execute_sql('PRAGMA user_version = %d' % until)


class MigrationTest(StorageTestCase):

    def test_migrating_from_zero_gives_the_schema_of_create_tables(self):
        migrated = self.path('migrated.db')
        database = self.open(migrated)
        self.assertEqual(migrate.schema_version(self.store), 0)
        self.migrate()
        self.store.close()

        created = self.path('created.db')
        database = self.open(created)
        database.create_tables(MODELS)
        self.store.close()

        expected, actual = schema_of(created), schema_of(migrated)
        self.assertEqual(sorted(actual), sorted(expected))
        for table in ('outbox', 'inbox', 'sessions', 'idempotency', 'events'):
            self.assertIn(table, expected)
        for table in expected:
            self.assertEqual(actual[table]['columns'], expected[table]['columns'], table)
            self.assertEqual(actual[table]['indexes'], expected[table]['indexes'], table)
        # The indexes spec/daemon.md §3 names are there, with the right shape.
        outbox, inbox = actual['outbox']['indexes'], actual['inbox']['indexes']
        self.assertEqual(outbox['outbox_aborted']['partial'], 1)
        self.assertEqual(inbox['inbox_dedupe'],
                         {'unique': 1, 'origin': 'c', 'partial': 0,
                          'columns': ['mesh', 'sender_pubkey', 'client_message_id',
                                      'recipient_pubkey']})

    def test_migrate_sets_head_and_a_second_migrate_is_a_noop(self):
        path = self.path()
        self.open(path)
        self.assertEqual(self.migrate(), (0, HEAD))
        self.assertEqual(migrate.schema_version(self.store), HEAD)
        with self.store.writing():
            Session.create(token='a' * 64, session_id='s', mesh='m', display_name='d', pid=1,
                           registered_at=1)
        before = schema_of(path)
        self.assertEqual(self.migrate(), (HEAD, HEAD))
        self.assertEqual(migrate.schema_version(self.store), HEAD)
        self.assertEqual(schema_of(path), before)
        self.assertEqual(Session.select().count(), 1)
        self.assertEqual([name for name in os.listdir(self.home) if 'pre-migration' in name], [])

    def test_schema_newer_than_head_raises_and_changes_nothing(self):
        path = self.path()
        conn = sqlite3.connect(path)
        conn.execute('CREATE TABLE future (x INTEGER)')
        conn.execute('INSERT INTO future VALUES (42)')
        conn.execute('PRAGMA user_version = 99')
        conn.commit()
        conn.close()
        before = schema_of(path)
        self.open(path)
        with self.assertRaises(SchemaTooNewError) as caught:
            self.migrate()
        self.assertIsInstance(caught.exception, StorageError)
        self.assertEqual((caught.exception.found, caught.exception.head), (99, HEAD))
        numbers = re.findall(r'\d+', str(caught.exception))
        self.assertIn('99', numbers)
        self.assertIn(str(HEAD), numbers)
        self.store.close()
        self.assertEqual(user_version(path), 99)
        self.assertEqual(schema_of(path), before)
        conn = sqlite3.connect(path)
        self.assertEqual(conn.execute('SELECT x FROM future').fetchall(), [(42,)])
        conn.close()
        self.assertEqual([name for name in os.listdir(self.home) if 'pre-migration' in name], [])

    def test_existing_database_is_copied_aside_before_migrating(self):
        path = self.path()
        conn = sqlite3.connect(path)
        conn.execute('CREATE TABLE notes (body TEXT)')
        conn.execute("INSERT INTO notes VALUES ('keep me')")
        conn.commit()
        conn.close()
        self.open(path)
        previous = os.umask(0)
        try:
            self.assertEqual(self.migrate(), (0, HEAD))
        finally:
            os.umask(previous)
        copy = migrate.backup_path(path, 0)
        self.assertTrue(os.path.exists(copy), copy)
        self.assertEqual(mode_of(copy), 0o600, oct(mode_of(copy)))
        # The copy is the database as it was before migration 1 ran.
        self.assertEqual(user_version(copy), 0)
        self.assertEqual(sorted(schema_of(copy)), ['notes'])
        conn = sqlite3.connect(copy)
        self.assertEqual(conn.execute('SELECT body FROM notes').fetchall(), [('keep me',)])
        conn.close()
        self.assertEqual(migrate.schema_version(self.store), HEAD)
        self.assertIn('outbox', schema_of(path))


    def test_a_version_1_database_gains_the_link_queue_index_and_keeps_its_rows(self):
        path = self.path()
        self.open(path)
        self.run_migrations(1)
        Outbox.insert(**outbox_row(id='kept')).execute()
        self.assertNotIn('outbox_link_queue', schema_of(path)['outbox']['indexes'])
        self.assertEqual(self.migrate(), (1, HEAD))
        self.assertEqual(schema_of(path)['outbox']['indexes']['outbox_link_queue']['columns'],
                         ['status', 'mesh', 'sender_session_pubkey'])
        self.assertEqual([row.id for row in Outbox.select()], ['kept'])
        self.assertEqual(user_version(migrate.backup_path(path, 1)), 1)

    def test_a_version_2_database_is_rebuilt_for_dedupe_by_sender_without_losing_rows(self):
        """Migration 3: the inbox key gains mesh and sender, recipients become NOT NULL, the
        outbox accepts `undelivered`; every row of both tables survives."""
        path = self.path()
        database = self.open(path)
        self.run_migrations(2)
        columns = ('id', 'client_message_id', 'mesh', 'sender_pubkey', 'sender_name', 'body',
                   'received_at', 'recipient_pubkey')
        old_rows = [('one', 'cm-1', 'm', 'ab' * 32, 'peer', 'first', 1, 'aa' * 32),
                    ('two', 'cm-1', 'm', 'ab' * 32, 'peer', 'second', 2, 'bb' * 32),
                    ('legacy', 'cm-2', 'm', 'ab' * 32, 'peer', 'third', 3, None)]
        for row in old_rows:
            database.execute_sql('INSERT INTO inbox (%s) VALUES (%s)'
                                 % (', '.join(columns), ', '.join('?' * len(columns))), row)
        Outbox.insert(**outbox_row(id='queued')).execute()
        self.assertEqual(self.migrate(), (2, HEAD))
        rows = {row.id: row for row in Inbox.select()}
        self.assertEqual(sorted(rows), ['legacy', 'one', 'two'])
        self.assertEqual((rows['one'].body, rows['two'].body, rows['legacy'].recipient_pubkey),
                         ('first', 'second', ''))
        self.assertEqual({row.e2e for row in rows.values()}, {0})
        self.assertEqual([row.id for row in Outbox.select()], ['queued'])
        Outbox.update(status='undelivered').where(Outbox.id == 'queued').execute()
        with self.store.writing():  # a second sender's row with the same id now fits
            Inbox.create(**inbox_row(client_message_id='cm-1', recipient_pubkey='aa' * 32,
                                     sender_pubkey='cd' * 32))
        self.assertEqual(Inbox.select().where(Inbox.client_message_id == 'cm-1').count(), 3)
        self.assertEqual(database.execute_sql('PRAGMA auto_vacuum').fetchone()[0],
                         migrate.AUTO_VACUUM_INCREMENTAL)


class DaemonSchemaTest(StorageTestCase):

    def test_daemon_refuses_a_database_newer_than_the_code(self):
        daemon_dir = os.path.join(self.home, 'daemon')
        os.mkdir(daemon_dir, 0o700)
        path = os.path.join(daemon_dir, 'meshd.db')
        conn = sqlite3.connect(path)
        conn.execute('PRAGMA user_version = 99')
        conn.commit()
        conn.close()
        os.chmod(path, 0o600)
        daemon = self.start_daemon(wait=False)
        self.assertEqual(daemon.wait_exit(), 1, daemon.stderr())
        lines = [text for text in daemon.stderr().splitlines() if text.strip()]
        self.assertEqual(len(lines), 1, lines)
        self.assertNotIn('Traceback', daemon.stderr())
        numbers = re.findall(r'\d+', lines[0])
        self.assertIn('99', numbers, lines[0])
        self.assertIn(str(HEAD), numbers, lines[0])
        self.assertEqual(user_version(path), 99)
        self.assertFalse(os.path.exists(os.path.join(daemon_dir, 'meshd.sock')))
        self.assertFalse(os.path.exists(os.path.join(daemon_dir, 'meshd.pid')))


class FileModeTest(StorageTestCase):

    def test_database_file_is_0600_even_under_umask_0(self):
        path = self.path()
        previous = os.umask(0)
        try:
            self.open_migrated()
            with self.store.writing():
                Session.create(token='b' * 64, session_id='s', mesh='m', display_name='d',
                               pid=1, registered_at=1)
        finally:
            os.umask(previous)
        self.assertEqual(mode_of(path), 0o600, oct(mode_of(path)))
        for suffix in ('-wal', '-shm'):
            if os.path.exists(path + suffix):
                self.assertEqual(mode_of(path + suffix), 0o600, suffix)
        self.assertTrue(os.path.exists(path + '-wal'), 'journal_mode=wal is not in effect')


class WriteLockTest(StorageTestCase):

    def test_writing_serialises_concurrent_writers(self):
        self.open_migrated()
        rows, trace = 40, []

        def writer(name):
            for number in range(rows):
                with self.store.writing():
                    trace.append(('begin', name))
                    Idempotency.create(client_message_id='%s-%d' % (name, number),
                                       request_fingerprint=b'\x00' * 32, outbox_id='o',
                                       created_at=number)
                    gevent.sleep(0)  # let the other writer run while the transaction is open
                    trace.append(('commit', name))
                gevent.sleep(0)  # and between transactions, so that both contend throughout

        greenlets = [gevent.spawn(writer, 'a'), gevent.spawn(writer, 'b')]
        gevent.joinall(greenlets, timeout=DEADLINE)
        for greenlet in greenlets:
            self.assertTrue(greenlet.ready(), 'a writer is stuck')
            if not greenlet.successful():
                raise greenlet.exception  # e.g. OperationalError: database is locked
        self.assertEqual(Idempotency.select().count(), 2 * rows)
        for name in ('a', 'b'):
            self.assertEqual(Idempotency.select()
                             .where(Idempotency.client_message_id.startswith(name + '-'))
                             .count(), rows)
        # Transactions never overlapped: every begin is followed by its own commit.
        self.assertEqual(len(trace), 4 * rows)
        for begin, commit in zip(trace[0::2], trace[1::2]):
            self.assertEqual((begin[0], commit[0]), ('begin', 'commit'), trace)
            self.assertEqual(begin[1], commit[1], trace)
        # ... and the writers really ran concurrently (the lock was contended).
        owners = [name for kind, name in trace if kind == 'begin']
        self.assertLess(owners.index('b'), len(owners) - owners[::-1].index('a') - 1)

    def test_reader_is_not_blocked_by_an_open_write_transaction(self):
        self.open_migrated()
        with self.store.writing():
            Session.create(token='c' * 64, session_id='before', mesh='m', display_name='d',
                           pid=1, registered_at=1)
        in_transaction, release = gevent.event.Event(), gevent.event.Event()

        def writer():
            with self.store.writing():
                Session.create(token='d' * 64, session_id='during', mesh='m',
                               display_name='d', pid=1, registered_at=2)
                in_transaction.set()
                release.wait(DEADLINE)

        def reader():
            with self.store.reading():
                return sorted(row.session_id for row in Session.select())

        writing = gevent.spawn(writer)
        try:
            self.assertTrue(in_transaction.wait(DEADLINE))
            reading = gevent.spawn(reader)
            reading.join(DEADLINE)
            self.assertTrue(reading.ready(), 'the reader waited for the writer')
            self.assertFalse(writing.ready())
            self.assertTrue(reading.successful(), reading.exception)
            self.assertEqual(reading.value, ['before'])  # the uncommitted row is invisible
        finally:
            release.set()
            writing.join(DEADLINE)
        self.assertTrue(writing.successful(), writing.exception)
        self.assertEqual(Session.select().count(), 2)


class ModelTest(StorageTestCase):

    def setUp(self):
        super().setUp()
        self.open_migrated()

    def test_recover_inflight_resets_only_inflight_rows(self):
        old = now_ms() - 60000
        with self.store.writing():
            for status in ('pending', 'inflight', 'done', 'dead', 'aborted'):
                Outbox.create(**outbox_row(id=status, status=status, attempts=3,
                                           next_attempt_at=old))
            Outbox.create(**outbox_row(id='inflight-2', status='inflight', attempts=7,
                                       next_attempt_at=old))
        now = now_ms()
        with self.store.writing():
            self.assertEqual(Outbox.recover_inflight(now), 2)
        rows = {row.id: row for row in Outbox.select()}
        for row_id, attempts in (('inflight', 3), ('inflight-2', 7)):
            self.assertEqual(rows[row_id].status, 'pending')
            self.assertEqual(rows[row_id].attempts, attempts)
            self.assertEqual(rows[row_id].next_attempt_at, now)
        for status in ('pending', 'done', 'dead', 'aborted'):
            self.assertEqual(rows[status].status, status)
            self.assertEqual(rows[status].attempts, 3)
            self.assertEqual(rows[status].next_attempt_at, old)

    def test_inbox_in_scope_returns_unscoped_own_session_and_own_member_rows(self):
        session, member = '5e' * 32, '3b' * 32
        recipients = {'legacy': '', 'mine': session, 'member': member,
                      'sibling': '7c' * 32, 'other-member': '9d' * 32}
        with self.store.writing():
            for row_id, recipient in recipients.items():
                Inbox.create(**inbox_row(id=row_id, recipient_pubkey=recipient))
        scoped = sorted(row.id for row in Inbox.select().where(Inbox.in_scope((session, member))))
        self.assertEqual(scoped, ['legacy', 'member', 'mine'])
        everything = sorted(row.id for row in Inbox.select().where(Inbox.in_scope(None)))
        self.assertEqual(everything, sorted(recipients))

    def test_inbox_dedupe_index_is_per_sender_and_recipient(self):
        """The id alone was the key: a second sender's DM with the same id was dropped."""
        with self.store.writing():
            Inbox.create(**inbox_row(client_message_id='cm-1', recipient_pubkey='aa' * 32))
        with self.assertRaises(IntegrityError):
            with self.store.writing():
                Inbox.create(**inbox_row(client_message_id='cm-1', recipient_pubkey='aa' * 32))
        with self.store.writing():
            Inbox.create(**inbox_row(client_message_id='cm-1', recipient_pubkey='bb' * 32))
            Inbox.create(**inbox_row(client_message_id='cm-1', recipient_pubkey='aa' * 32,
                                     sender_pubkey='cd' * 32))
            Inbox.create(**inbox_row(client_message_id='cm-1', recipient_pubkey='aa' * 32,
                                     mesh='other'))
        self.assertEqual(Inbox.select().where(Inbox.client_message_id == 'cm-1').count(), 4)


class PrunerTest(StorageTestCase):

    def test_pruner_deletes_only_rows_past_retention(self):
        self.open_migrated()
        now = now_ms()
        old, edge, recent = now - 31 * DAY_MS, now - 30 * DAY_MS, now - 29 * DAY_MS
        with self.store.writing():
            for name, received in (('old', old), ('edge', edge), ('recent', recent)):
                Inbox.create(**inbox_row(id='inbox-' + name, received_at=received))
            for status in ('pending', 'inflight', 'done', 'dead', 'aborted'):
                Outbox.create(**outbox_row(id='old-' + status, status=status, enqueued_at=old))
                Outbox.create(**outbox_row(id='recent-' + status, status=status,
                                           enqueued_at=recent))
            for name, created in (('old', old), ('recent', recent)):
                Idempotency.create(client_message_id='key-' + name,
                                   request_fingerprint=b'\x02' * 32, outbox_id='recent-done',
                                   created_at=created)
        removed = Pruner(self.store, EventBus(self.store, 'epoch-x')).step(now=now)
        self.assertEqual(removed.get('inbox'), 1, removed)
        self.assertEqual(removed.get('outbox'), 3, removed)
        self.assertEqual(removed.get('idempotency'), 1, removed)
        self.assertEqual(sorted(row.id for row in Inbox.select()), ['inbox-edge', 'inbox-recent'])
        self.assertEqual(sorted(row.id for row in Outbox.select()),
                         sorted(['old-pending', 'old-inflight']
                                + ['recent-' + status for status in
                                   ('pending', 'inflight', 'done', 'dead', 'aborted')]))
        self.assertEqual([row.client_message_id for row in Idempotency.select()], ['key-recent'])
        # A second pass finds nothing more to do.
        again = Pruner(self.store, EventBus(self.store, 'epoch-x')).step(now=now)
        self.assertEqual((again.get('inbox'), again.get('outbox'), again.get('idempotency')),
                         (0, 0, 0))
        self.assertEqual(Event.select().count(), 0)


    def test_a_long_prune_lets_other_writes_through_and_shrinks_the_file(self):
        """Finding 7: pruning 100k rows was one DELETE on the hub (daemon.version froze for
        2.4-2.9 s) and the file never shrank (auto_vacuum off)."""
        path = self.path()
        self.open_migrated()
        writer = gevent.spawn(self.store.writer.run)
        self.addCleanup(lambda: (self.store.writer.stop(5), writer.join(5)))
        gevent.sleep(0)  # the writer runs: from here writes are queued to it
        old = now_ms() - 31 * DAY_MS
        rows = [inbox_row(received_at=old, body='x' * 500) for _ in range(6000)]
        with self.store.writing():
            for start in range(0, len(rows), 500):
                Inbox.insert_many(rows[start:start + 500]).execute()
        self.store.database.execute_sql('PRAGMA wal_checkpoint(TRUNCATE)')
        size_before = os.path.getsize(path)
        pruner = Pruner(self.store, EventBus(self.store, 'epoch-x'), batch=200)
        pruning = gevent.spawn(pruner.step)
        done_while_pruning = []
        deadline = time.monotonic() + DEADLINE
        while (not pruning.ready() and time.monotonic() < deadline
               and len(done_while_pruning) < 50):
            self.store.write(lambda: Inbox.create(**inbox_row()))
            if not pruning.ready():
                done_while_pruning.append(True)
        removed = pruning.get()
        self.assertEqual(removed['inbox'], 6000)
        # Other writes were committed between the prune's batches, not after all of them.
        self.assertGreaterEqual(len(done_while_pruning), 5)
        self.assertGreater(removed['pages'], 0)
        self.store.database.execute_sql('PRAGMA wal_checkpoint(TRUNCATE)')
        self.assertLess(os.path.getsize(path), size_before / 2)


class GroupWriterTest(StorageTestCase):

    def start_writer(self):
        writer = gevent.spawn(self.store.writer.run)
        self.addCleanup(lambda: (self.store.writer.stop(5), writer.join(5)))
        gevent.sleep(0)
        return writer

    def hold_write_lock(self):
        """Hold the write lock in another greenlet, so that writes queue up behind it (this
        greenlet is not a writer, so its writes are queued, not run inline); return the
        function that lets go."""
        holding, release = gevent.event.Event(), gevent.event.Event()

        def hold():
            with self.store.writing():
                holding.set()
                release.wait(DEADLINE)
        holder = gevent.spawn(hold)
        holding.wait(DEADLINE)

        def let_go():
            release.set()
            holder.join(DEADLINE)
        return let_go

    def test_at_full_the_wal_is_synced_after_each_commit_before_its_writer_hears(self):
        """FULL durability by our own fdatasync of the WAL in a thread: it must run after
        every commit, alone or grouped, and before the write's result is set."""
        self.open_migrated()
        real = os.fdatasync
        seen = []
        pending = []

        def fdatasync(fd):
            seen.append([result.ready() for result in pending])
            return real(fd)
        self.start_writer()
        with mock.patch('storage.store.os.fdatasync', side_effect=fdatasync):
            alone = self.store.writer.write_async(
                lambda: Event.create(epoch='e', kind='alone', ts='t', data='{}').seq)
            pending.append(alone)
            alone.get(DEADLINE)
            let_go = self.hold_write_lock()
            grouped = [self.store.writer.write_async(
                lambda n=n: Event.create(epoch='e', kind='g%d' % n, ts='t', data='{}').seq)
                for n in range(3)]
            pending[:] = grouped
            let_go()
            for result in grouped:
                result.get(DEADLINE)
        self.assertGreaterEqual(len(seen), 2)
        self.assertTrue(all(not any(ready) for ready in seen), seen)

    def test_at_normal_nothing_is_synced_by_hand(self):
        self.store = Store(models_database).open_sqlite(self.path('normal.db'), 'normal')
        self.addCleanup(self.store.close)
        self.migrate()
        self.start_writer()
        with mock.patch('storage.store.os.fdatasync') as fdatasync:
            self.store.writer.write_async(
                lambda: Event.create(epoch='e', kind='k', ts='t', data='{}').seq).get(DEADLINE)
        fdatasync.assert_not_called()

    def test_a_disk_full_rollback_fails_every_write_of_the_batch(self):
        """With the disk full, SQLite rolled the whole group transaction back while the
        writes before the failing one were still reported committed (a lost message)."""
        database = self.open_migrated()
        pages = database.execute_sql('PRAGMA page_count').fetchone()[0]
        self.start_writer()

        def small(tag):
            return Event.create(epoch='e', kind=tag, ts='t', data='{}').seq

        def big():
            database.execute_sql('PRAGMA max_page_count = %d' % (pages + 3))
            return Event.create(epoch='e', kind='big', ts='t', data='x' * 200000).seq
        jobs = [gevent.spawn(self.store.write, small, 'a'), gevent.spawn(self.store.write, big),
                gevent.spawn(self.store.write, small, 'c')]
        gevent.joinall(jobs, timeout=DEADLINE)
        self.store.write(lambda: database.execute_sql('PRAGMA max_page_count = 1073741823'))
        with self.store.reading():
            committed = [event.kind for event in Event.select()]
        for job in jobs:
            if job.successful():
                # A write reported committed must be in the database.
                self.assertIn('a' if job is jobs[0] else 'c', committed)
        self.assertNotIn('big', committed)
        self.assertTrue(any(not job.successful() for job in jobs))

    def test_execute_queued_behind_a_write_that_aborts_the_batch_raises(self):
        """execute() waited forever when the batch failed before its write ran."""
        database = self.open_migrated()
        self.start_writer()

        def end_the_transaction():
            # What SQLite does on disk full or an I/O error: the whole transaction is gone.
            database.execute_sql('ROLLBACK')
            raise RuntimeError('disk I/O error')
        let_go = self.hold_write_lock()
        # Queued together, so that they share one batch.
        first = gevent.spawn(self.store.write, end_the_transaction)
        second = gevent.spawn(self.store.writer.execute, lambda: Event.create(
            epoch='e', kind='small', ts='t', data='{}').seq)
        gevent.sleep(0)
        let_go()
        gevent.joinall([first, second], timeout=DEADLINE)
        self.assertTrue(second.ready(), 'execute() still waiting')
        self.assertFalse(first.successful())
        self.assertFalse(second.successful())
        with self.store.reading():
            self.assertEqual(Event.select().count(), 0)

    def test_writes_queued_when_the_writer_stops_still_run(self):
        self.open_migrated()
        self.start_writer()
        self.store.writer.stop(5)
        seq = self.store.write(lambda: Event.create(epoch='e', kind='late', ts='t', data='{}').seq)
        self.assertTrue(seq)

    def test_write_inside_writing_from_another_greenlet_runs_inline(self):
        """write() inside writing() outside the writer greenlet waited on the lock it held."""
        self.open_migrated()
        self.start_writer()

        def nested():
            with self.store.writing():
                return self.store.write(
                    lambda: Event.create(epoch='e', kind='nested', ts='t', data='{}').seq)
        job = gevent.spawn(nested)
        job.join(timeout=DEADLINE)
        self.assertTrue(job.successful())

    def test_execute_returns_once_the_write_ran_before_its_commit(self):
        self.open_migrated()
        self.start_writer()
        writer = self.store.writer
        gate = gevent.event.Event()
        let_go = self.hold_write_lock()
        early = gevent.spawn(writer.execute, lambda: Event.create(
            epoch='e', kind='early', ts='t', data='{}').seq)
        blocker = gevent.spawn(writer.write, lambda: gate.wait(DEADLINE))
        gevent.sleep(0)
        let_go()
        self.assertTrue(early.get(timeout=DEADLINE))
        outside = sqlite3.connect(self.path(), timeout=10)
        self.addCleanup(outside.close)
        # The batch is still open (the next write waits on the gate): nothing is committed.
        self.assertEqual(outside.execute('SELECT count(*) FROM events').fetchone()[0], 0)
        gate.set()
        blocker.join(DEADLINE)
        self.assertEqual(outside.execute("SELECT kind FROM events").fetchall(), [('early',)])

    def test_queued_writes_report_after_their_commit_in_order_and_a_failed_submit_stays_its_own(self):
        self.open_migrated()
        self.start_writer()
        writer = self.store.writer
        let_go = self.hold_write_lock()
        # The writer waits on the lock the holder has, so everything below queues up.
        results = [writer.write_async(lambda n=n: Event.create(
            epoch='e', kind='k%d' % n, ts='t', data='{}').seq) for n in range(5)]
        writer.submit(lambda: Event.create(epoch='e', kind='fire', ts='t', data='{}'))
        writer.submit(lambda: 1 / 0)
        gevent.sleep(0)
        self.assertFalse(any(result.ready() for result in results))
        let_go()
        seqs = [result.get(timeout=DEADLINE) for result in results]
        self.assertEqual(seqs, sorted(seqs))
        self.store.write(lambda: None)  # queued after the submits: they have committed
        with self.store.reading():
            kinds = [event.kind for event in Event.select().order_by(Event.seq)]
        self.assertEqual(kinds, ['k0', 'k1', 'k2', 'k3', 'k4', 'fire'])
