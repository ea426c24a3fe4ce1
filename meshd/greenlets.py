"""One supervisor for every greenlet of a process: the daemon's and the broker's.

Every greenlet starts here, named, in one Group, with `link_exception` to a handler that
logs the crash (locust's `greenlet_exception_logger`) and then applies the greenlet's crash
policy: RESTART it with backoff (huey's `check_worker_health`), or only LOG it (short
tasks: a send in flight, a push being stored). `every()` runs a periodic step that logs its
own failures and waits on the stop event, never on a sleep, so a stop is prompt. `stop()`
ends them all. Nothing here knows what the greenlets do.
"""
import logging

import gevent
import gevent.event
import gevent.pool

log = logging.getLogger(__name__)

RESTART = 'restart'
LOG = 'log'
BACKOFF_MAX = 30.0


class Supervisor:
    """The greenlets of one process, started, watched and stopped in one place."""

    def __init__(self, backoff_max=BACKOFF_MAX):
        self.backoff_max = backoff_max
        self.group = gevent.pool.Group()
        self.stopping = gevent.event.Event()
        self._restarts = {}

    def spawn(self, name, fn, *args, on_crash=RESTART):
        """Start `fn(*args)` as a named greenlet; a crash is logged, then restarted with
        backoff (RESTART, for loops that must run for the process's life) or not (LOG)."""
        greenlet = gevent.Greenlet(fn, *args)
        self._watch(greenlet, name, fn, args, on_crash)
        greenlet.start()
        return greenlet

    def spawn_later(self, seconds, name, fn, *args):
        """Start `fn(*args)` after `seconds` (a timer such as a grace window); crash logged."""
        greenlet = gevent.Greenlet(fn, *args)
        self._watch(greenlet, name, fn, args, LOG)
        greenlet.start_later(seconds)
        return greenlet

    def every(self, name, interval, step, wait_first=False, wrap=None):
        """Run `step()` every `interval` seconds (a number, or a function read each time)
        until stop; a failing step is logged and the next interval retries. `wrap`, when
        given, is a context manager factory each step runs inside (a database connection)."""
        def seconds():
            return interval() if callable(interval) else interval

        def loop():
            if wait_first and self.stopping.wait(seconds()):
                return
            while not self.stopping.is_set():
                try:
                    if wrap is None:
                        step()
                    else:
                        with wrap():
                            step()
                except Exception:
                    log.exception('%s step failed', name)
                if self.stopping.wait(seconds()):
                    return
        return self.spawn(name, loop)

    def pool(self, size, name):
        """A bounded set of short tasks (LOG on crash): `pool.spawn(fn, *args)` blocks the
        caller while `size` are running, which is the backpressure on whoever feeds it."""
        return TaskPool(self, size, name)

    def stop(self, timeout, join_first=False):
        """Set the stop event and kill what runs; with `join_first`, greenlets first get
        `timeout` to finish what they are doing (a step inside a query must not be killed
        half way through its transaction)."""
        self.stopping.set()
        if join_first:
            self.group.join(timeout=timeout)
        self.group.kill(timeout=timeout)

    def join_except(self, keep, timeout):
        """Wait up to `timeout` for every greenlet but `keep` (one the caller stops itself,
        such as a writer that must outlive the others) to end."""
        others = [g for g in self.group.greenlets if g is not keep]
        gevent.joinall(others, timeout=timeout)

    def kill(self, timeout):
        """Kill every greenlet at once (an aborted start)."""
        self.stopping.set()
        self.group.kill(timeout=timeout)

    # -- crashes -----------------------------------------------------------------------

    def _watch(self, greenlet, name, fn, args, on_crash):
        greenlet.name = name
        self.group.add(greenlet)
        greenlet.link_exception(lambda dead: self._crashed(dead, name, fn, args, on_crash))

    def _crashed(self, greenlet, name, fn, args, on_crash):
        log.error('greenlet_crashed', exc_info=greenlet.exc_info,
                  extra={'fields': {'greenlet': name}})
        if on_crash != RESTART or self.stopping.is_set():
            return
        count = self._restarts[name] = self._restarts.get(name, 0) + 1
        delay = min(self.backoff_max, 2 ** min(count, 5) / 2.0)

        def restart():
            if not self.stopping.wait(delay):
                self.spawn(name, fn, *args, on_crash=on_crash)
        self.spawn('restart:%s' % name, restart, on_crash=LOG)


class TaskPool:
    """Short supervised tasks, at most `size` at once (see Supervisor.pool)."""

    def __init__(self, supervisor, size, name):
        self.supervisor = supervisor
        self.name = name
        self._slots = gevent.pool.Pool(size)

    def spawn(self, fn, *args):
        self._slots.wait_available()
        greenlet = gevent.Greenlet(fn, *args)
        self.supervisor._watch(greenlet, self.name, fn, args, LOG)
        self._slots.add(greenlet)   # removed from the pool when it ends
        greenlet.start()
        return greenlet

    def join(self, timeout=None):
        self._slots.join(timeout=timeout)

    def kill(self, timeout=None):
        self._slots.kill(timeout=timeout)
