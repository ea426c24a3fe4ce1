"""Who may hold a connection to the broker before proving who they are (DESIGN.md 27).

Anyone who can reach the broker can open sockets, so everything before a hello has limits
and deadlines: an HTTP request must arrive within `request_timeout`, a WebSocket must say
hello within `hello_timeout` of its upgrade, and one source address may hold at most
`per_address` connections that have not said hello (raw or upgraded). The address is the
TCP peer's, or, when that peer is a configured trusted proxy, the right-most address of
X-Forwarded-For that is not a trusted proxy. WebSockets are capped at `max_connections`;
the server's greenlet pool is larger by HTTP_RESERVE, so `GET /health` is answered even
when every WebSocket place is taken. When a limit bites it is logged, at most once per
LOG_EVERY seconds per kind.
"""
import collections
import logging
import time

log = logging.getLogger(__name__)

DEFAULT_PER_ADDRESS = 16
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_REQUEST_TIMEOUT = 10.0
HTTP_RESERVE = 64
LOG_EVERY = 10.0


def parse_proxies(value):
    """`ADDR[,ADDR…]` (or a list) → a frozenset of addresses; None/'' → empty."""
    if not value:
        return frozenset()
    if isinstance(value, str):
        value = value.split(',')
    return frozenset(item.strip() for item in value if item and item.strip())


class Admission(object):
    """Counts of the connections that have not said hello, per source address."""

    def __init__(self, max_connections, per_address=DEFAULT_PER_ADDRESS,
                 hello_timeout=DEFAULT_HELLO_TIMEOUT, request_timeout=DEFAULT_REQUEST_TIMEOUT,
                 trusted_proxies=()):
        self.max_connections = int(max_connections)
        self.per_address = int(per_address)
        self.hello_timeout = float(hello_timeout)
        self.request_timeout = float(request_timeout)
        self.trusted_proxies = parse_proxies(trusted_proxies)
        self.pool_size = self.max_connections + HTTP_RESERVE
        self._raw = collections.Counter()       # TCP peer -> connections before a request
        self._unproven = collections.Counter()  # effective address -> sockets before hello
        self._logged = {}

    # ------------------------------------------------------------------ the HTTP phase

    def enter(self, peer):
        """A TCP connection was accepted; False when its peer holds too many already."""
        if peer not in self.trusted_proxies and self._raw[peer] >= self.per_address:
            self._note('broker_admission_refused', peer, 'connections before hello')
            return False
        self._raw[peer] += 1
        return True

    def leave(self, peer):
        self._drop(self._raw, peer)

    def address(self, environ):
        """The client's address: X-Forwarded-For is believed only from a trusted proxy."""
        peer = environ.get('REMOTE_ADDR') or ''
        if peer not in self.trusted_proxies:
            return peer
        forwarded = [part.strip() for part in environ.get('HTTP_X_FORWARDED_FOR', '').split(',')
                     if part.strip()]
        for hop in reversed(forwarded):
            if hop not in self.trusted_proxies:
                return hop
        return peer

    # ------------------------------------------------------------------ before the hello

    def refuse_upgrade(self, address, open_sockets):
        """Why an upgrade is refused now ((status, text)), or None."""
        if open_sockets >= self.max_connections:
            self._note('broker_admission_full', address, 'websocket places')
            return '503 Service Unavailable', 'broker at connection capacity'
        if self._unproven[address] >= self.per_address:
            self._note('broker_admission_refused', address, 'sockets before hello')
            return '429 Too Many Requests', 'too many connections without hello'
        return None

    def upgraded(self, address):
        self._unproven[address] += 1

    def proven(self, address):
        """The socket said hello (or closed before it): it no longer counts."""
        self._drop(self._unproven, address)

    def hello_timed_out(self, address):
        self._note('broker_hello_timeout', address, 'no hello within %gs' % self.hello_timeout)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _drop(counter, key):
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]

    def _note(self, event, address, what):
        count, since = self._logged.get(event, (0, 0.0))
        now = time.monotonic()
        if now - since >= LOG_EVERY:
            log.warning('%s: %s (%s; %d more since the last report)', event, address, what,
                        count)
            self._logged[event] = (0, now)
        else:
            self._logged[event] = (count + 1, since)
