"""Process liveness and start times, read with psutil (no subprocess, never blocks the hub)."""
import os

import psutil

START_TIME_TOLERANCE = 1.0   # create_time moves slightly when the clock is adjusted
MAX_PID = 2 ** 31 - 1        # pid_t is a signed 32-bit integer
MAX_ANCESTORS = 64


def is_alive(pid):
    """kill(pid, 0) succeeds. EPERM counts as dead: a session process runs as our user."""
    if not isinstance(pid, int) or not 0 < pid <= MAX_PID:
        return False
    try:
        os.kill(pid, 0)
        return True
    except (OSError, OverflowError):
        return False


def start_time(pid):
    """The process's start time as a decimal string, None when it cannot be read."""
    try:
        return '%.2f' % psutil.Process(pid).create_time()
    except (psutil.Error, ValueError, OverflowError, TypeError):
        return None


def same_start(recorded, live):
    """Whether two start-time strings name the same process start (within 1 s)."""
    try:
        return abs(float(recorded) - float(live)) <= START_TIME_TOLERANCE
    except (TypeError, ValueError):
        return recorded == live


def parent_pid(pid):
    """The parent's pid, None when the process is gone or cannot be read."""
    try:
        return psutil.Process(pid).ppid()
    except (psutil.Error, ValueError, OverflowError, TypeError):
        return None


def ancestors(pid):
    """The pids above `pid`, nearest first, up to (not including) pid 1 and 0."""
    chain = []
    current = parent_pid(pid)
    while current and current > 1 and current not in chain and len(chain) < MAX_ANCESTORS:
        chain.append(current)
        current = parent_pid(current)
    return chain
