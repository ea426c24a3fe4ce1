"""The session reaper: drops sessions whose process died or was replaced (spec/daemon.md §4.4).

One sweep reads the process table through psutil and never forks, so hundreds of sessions
cost nothing noticeable to the hub (field lesson: one `ps` per session stalled the daemon).
There is no wall-clock cut-off: a live session stays registered for as long as it runs.
"""
import logging

from meshd import procs

log = logging.getLogger(__name__)


class Reaper:
    """Sweeps the registry; `step()` runs one sweep and returns the tokens it dropped."""

    def __init__(self, registry, is_alive=procs.is_alive, start_time=procs.start_time):
        self.registry = registry
        self._is_alive = is_alive
        self._start_time = start_time

    def step(self):
        dropped = []
        for info in self.registry.all():
            if not self._is_alive(info.pid):
                dropped.append(info.token)
                continue
            if info.start_time is None:
                continue
            live = self._start_time(info.pid)
            if live is None:
                continue  # a probe race or failure: keep it, the next sweep decides
            if not procs.same_start(info.start_time, live):
                dropped.append(info.token)  # the pid was reused by another process
        for token in dropped:
            info = self.registry.resolve(token)
            if info is not None:
                log.info('session_reaped', extra={'fields': {
                    'token': token[:8], 'pid': info.pid, 'mesh': info.mesh}})
                self.registry.deregister(token)
        return dropped
