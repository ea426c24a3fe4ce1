"""The singleton: an flock held on meshd.pid for the daemon's whole life (spec/daemon.md §1.2).

The flock is the only truth. The pid written inside is informational: the CLI reads it to
signal the daemon, checking that the process really runs meshd. The CLI never takes the
lock (a probe holding it for an instant would make a starting daemon exit 1) and never
unlinks the file; only the daemon unlinks it, on a clean exit, while it still holds it.
"""
import errno
import fcntl
import os

import psutil


class AlreadyRunning(Exception):
    """Another daemon holds the lock."""

    def __init__(self, pid):
        self.pid = pid
        super().__init__('daemon already running (pid %s)' % (pid if pid else '?'))


class PidLock:
    """The flock-held pid file."""

    def __init__(self, path):
        self.path = path
        self._fd = None
        self.recovered_stale = False

    def acquire(self):
        """Take the lock and write our pid; AlreadyRunning when another daemon holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(_parse_pid(_read(self.path)))
            raise
        previous = os.read(fd, 64)
        self.recovered_stale = bool(previous.strip())
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode('ascii'))
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self):
        """Unlink the file if it still names us, then close it, which drops the lock."""
        if self._fd is None:
            return
        try:
            if _parse_pid(_read(self.path)) == os.getpid():
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None


def _read(path):
    try:
        with open(path, 'r') as handle:
            return handle.read()
    except OSError:
        return ''


def _parse_pid(text):
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def read_running_pid(path):
    """The pid in the file when that process is alive and runs meshd, else None."""
    pid = _parse_pid(_read(path))
    if pid is None:
        return None
    try:
        cmdline = ' '.join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return pid if 'meshd' in cmdline else None
