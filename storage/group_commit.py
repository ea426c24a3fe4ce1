"""Group commit: one writer greenlet commits the writes queued together in one transaction.

Under `synchronous=FULL` every commit is an fsync, and a peewee transaction costs far more
Python than the statements inside it, so writes submitted while a commit is running wait
and are committed together by the next one, each in its own savepoint so that a failing
write is rolled back alone. Every Store (storage/store.py) runs one writer over its own
database and write lock: the daemon's and the broker's.
"""
import logging

import gevent
import gevent.event
import gevent.queue

log = logging.getLogger(__name__)

MAX_BATCH = 128
_STOP = object()


class BatchAborted(Exception):
    """The database rolled the whole group transaction back (disk full, I/O error)."""


class GroupWriter:
    """Runs submitted writes in shared transactions.

    `transaction()` opens one write transaction (taking the caller's write lock) and
    `database.atomic()` nested inside it is a savepoint; `holds_write()` tells whether the
    calling greenlet is already inside a write, in which case queuing would wait on the lock
    it holds and the write runs inline instead. `write(fn, *args)` returns what `fn`
    returned once its transaction committed, or raises what `fn` raised; `write_async`
    returns at once a result to wait on later; `execute` returns once `fn` ran, before the
    commit; `submit` queues a write nobody waits for (failures are logged). Before `run()` starts and after `stop()`, writes run directly,
    each in its own transaction.
    """

    def __init__(self, database, transaction, holds_write, max_batch=MAX_BATCH, name='writer',
                 after_commit=None):
        self.database = database
        self.transaction = transaction
        self.holds_write = holds_write
        # Runs after each outermost commit, before anyone hears of it (the Store's fsync).
        self.after_commit = after_commit or (lambda: None)
        self.max_batch = max_batch
        self.name = name
        self._queue = gevent.queue.Queue()
        self._greenlet = None
        self._stopped = gevent.event.Event()

    def _runs_inline(self):
        current = gevent.getcurrent()
        return (self._greenlet is None or current is self._greenlet
                or self._stopped.is_set() or self.holds_write())

    def write(self, fn, *args, **kwargs):
        if self._runs_inline():
            return self._inline(fn, args, kwargs)
        result = gevent.event.AsyncResult()
        self._queue.put((fn, args, kwargs, result))
        return result.get()

    def write_async(self, fn, *args, **kwargs):
        """Queue a write and return at once an AsyncResult that is set after its commit."""
        return self._enqueue(gevent.event.AsyncResult(), fn, args, kwargs)

    def execute(self, fn, *args, **kwargs):
        """Run a write in the next transaction and return its result as soon as it ran, not
        once it committed. Only for writes whose loss in a crash or a rolled-back batch is
        harmless (claims: the rows stay pending and are handed out again); the writer being
        the only greenlet that runs them keeps them exclusive within the process."""
        ran = gevent.event.AsyncResult()

        def run():
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:
                ran.set_exception(exc)
                raise
            ran.set(value)
            return value
        committed = self.write_async(run)
        # A batch can fail before this write's turn (disk full in an earlier write): then
        # `run` never runs, and the batch's error comes through `committed`.
        gevent.wait([ran, committed], count=1)
        return ran.get() if ran.ready() else committed.get()

    def submit(self, fn, *args, **kwargs):
        """Queue a write nobody waits for; a failure is logged."""
        self._enqueue(_LoggedResult(fn), fn, args, kwargs)

    def _enqueue(self, result, fn, args, kwargs):
        if self._runs_inline():
            try:
                result.set(self._inline(fn, args, kwargs))
            except Exception as exc:
                result.set_exception(exc)
        else:
            self._queue.put((fn, args, kwargs, result))
        return result

    def _inline(self, fn, args, kwargs):
        """Run a write in the caller's greenlet: its own transaction, or a savepoint of the
        caller's (then the caller's commit is the one that counts)."""
        outermost = not self.holds_write()
        with self.transaction():
            value = fn(*args, **kwargs)
        if outermost:
            self.after_commit()
        return value

    def run(self):
        """The writer loop; returns after `stop()` once the queue is empty."""
        self._greenlet = gevent.getcurrent()
        self._stopped.clear()
        try:
            while True:
                job = self._queue.get()
                if job is _STOP:
                    return
                batch = [job]
                while len(batch) < self.max_batch and not self._queue.empty():
                    following = self._queue.get_nowait()
                    if following is _STOP:
                        self._queue.put(_STOP)
                        break
                    batch.append(following)
                self._commit(batch)
        finally:
            self._stopped.set()
            self._greenlet = None
            self._run_queued()

    def _commit(self, batch):
        try:
            self._commit_batch(batch)
        except BaseException:
            # Killed mid-batch (shutdown): nobody may wait forever on a result.
            for _fn, _args, _kwargs, result in batch:
                if not result.ready():
                    result.set_exception(RuntimeError('database writer stopped'))
            raise

    def _commit_batch(self, batch):
        if len(batch) == 1:
            # Alone in its transaction, a write needs no savepoint: its failure rolls back
            # only itself. (A savepoint cost about a tenth of a one-at-a-time send.)
            fn, args, kwargs, result = batch[0]
            try:
                with self.transaction():
                    value = fn(*args, **kwargs)
                self.after_commit()
            except Exception as exc:
                result.set_exception(exc)
                return
            result.set(value)
            return
        outcomes = []
        try:
            with self.transaction():
                connection = self.database.connection()
                for fn, args, kwargs, _result in batch:
                    try:
                        with self.database.atomic():  # a savepoint: a failure stays its own
                            outcomes.append((True, fn(*args, **kwargs)))
                    except Exception as exc:
                        if not getattr(connection, 'in_transaction', True):
                            # SQLite rolled back the whole transaction (disk full, I/O
                            # error): the writes before this one are gone too.
                            raise BatchAborted('write transaction rolled back: %s' % exc)
                        outcomes.append((False, exc))
            self.after_commit()
        except Exception as exc:
            for _fn, _args, _kwargs, result in batch:
                result.set_exception(exc)
            return
        for (ok, value), (_fn, _args, _kwargs, result) in zip(outcomes, batch):
            if ok:
                result.set(value)
            else:
                result.set_exception(value)

    def _run_queued(self):
        """After the loop ends, run what is still queued directly, each in its own transaction."""
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is _STOP:
                continue
            fn, args, kwargs, result = job
            try:
                result.set(self._inline(fn, args, kwargs))
            except Exception as exc:
                result.set_exception(exc)

    def stop(self, timeout=10):
        """Finish the writes already queued, then stop the loop."""
        if self._greenlet is not None:
            self._queue.put(_STOP)
            self._stopped.wait(timeout)


class _LoggedResult(gevent.event.AsyncResult):
    """The result of a submitted write: nobody reads it, so a failure is logged."""

    def __init__(self, fn):
        super().__init__()
        self._what = getattr(fn, '__qualname__', repr(fn))

    def set_exception(self, exception, exc_info=None):
        log.error('queued write %s failed: %s', self._what, exception)
        super().set_exception(exception, exc_info)
