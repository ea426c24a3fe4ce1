"""Who may hold a connection to the daemon, and for how long (DESIGN.md 27).

No local client may lock the owner out: the Unix socket and TCP have separate capacity, so
connections to the TCP port (any local user can open them) never take a place the owner's
socket needs. A full transport makes room by closing its longest-idle connection (one
that is not running a call, streaming events or owed answers), unauthenticated ones
first; only when every connection is working is a newcomer refused, with a `busy` answer.
A TCP connection that does not `auth` within `auth_timeout` is closed, and so is any
connection idle for `idle_timeout` that is not subscribed to events. When a limit bites
it is logged, at most once per LOG_EVERY seconds per kind.
"""
import logging
import time

log = logging.getLogger(__name__)

UDS_CAPACITY = 256
TCP_CAPACITY = 64
AUTH_TIMEOUT = 5.0
IDLE_TIMEOUT = 300.0
MAX_PENDING_ANSWERS = 1024   # pipelined answers owed on one connection before it stops reading
LOG_EVERY = 10.0


class Limits:
    """The numbers of the local API's admission rules."""

    def __init__(self, uds_capacity=UDS_CAPACITY, tcp_capacity=TCP_CAPACITY,
                 auth_timeout=AUTH_TIMEOUT, idle_timeout=IDLE_TIMEOUT,
                 max_pending=MAX_PENDING_ANSWERS):
        self.capacity = {'uds': int(uds_capacity), 'tcp': int(tcp_capacity)}
        self.auth_timeout = float(auth_timeout)
        self.idle_timeout = float(idle_timeout)
        self.max_pending = int(max_pending)

    @property
    def sweep_interval(self):
        """How often deadlines are checked: a fraction of the shortest, within [0.05, 1] s."""
        return max(0.05, min(1.0, min(self.auth_timeout, self.idle_timeout) / 4))


class Admission:
    """The open connections of each transport, their capacity and their deadlines."""

    def __init__(self, limits):
        self.limits = limits
        self._open = {'uds': {}, 'tcp': {}}   # transport -> {conn: None}, oldest first
        self._logged = {}

    def admit(self, conn):
        """Make room for `conn` and count it; False when every place is working (busy)."""
        open_conns = self._open[conn.transport]
        if len(open_conns) >= self.limits.capacity[conn.transport]:
            victim = self._victim(conn.transport)
            if victim is None:
                self._note('ipc_capacity_busy', conn.transport)
                return False
            self._note('ipc_idle_connection_evicted', conn.transport)
            self.release(victim)
            victim.close()
        open_conns[conn] = None
        return True

    def release(self, conn):
        self._open[conn.transport].pop(conn, None)

    def count(self, transport):
        return len(self._open[transport])

    def _victim(self, transport):
        idle = [c for c in self._open[transport] if c.is_idle]
        if not idle:
            return None
        return min(idle, key=lambda c: (c.authenticated, c.last_activity))

    def expired(self, now=None):
        """Connections past their deadline: no `auth` in time, or idle for too long."""
        now = time.monotonic() if now is None else now
        limits = self.limits
        for transport in ('uds', 'tcp'):
            for conn in list(self._open[transport]):
                if not conn.authenticated and now - conn.opened_at > limits.auth_timeout:
                    self._note('ipc_auth_timeout', transport)
                    yield conn
                elif conn.is_idle and now - conn.last_activity > limits.idle_timeout:
                    yield conn

    def _note(self, event, transport):
        key = (event, transport)
        count, since = self._logged.get(key, (0, 0.0))
        now = time.monotonic()
        if now - since >= LOG_EVERY:
            log.warning(event, extra={'fields': {'transport': transport,
                                                 'open': self.count(transport),
                                                 'since_last_log': count + 1}})
            self._logged[key] = (0, now)
        else:
            self._logged[key] = (count + 1, since)
