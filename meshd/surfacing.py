"""What reached each session's agent (spec/agents.md §1, DESIGN.md 13 and 26).

Per registered session, in memory: how many MCP bridges stream its events, when one last
emitted a channel notification, and when its hooks last handed rows over (the mark that
PostToolUse hands over only what became due since). And a watch: a row that no path
surfaced within `not_surfaced_after` seconds while a session it belongs to is alive raises
one `warning` event (`not_surfaced`) per session, so a session with neither channels nor
hooks is visible instead of silently deaf.
"""
import collections
import logging

from storage.models import Inbox

from meshd import clock
from meshd.clock import iso_from_ms

log = logging.getLogger(__name__)

OVERDUE_BATCH = 200


class AgentState:
    """One session's last-hop state."""

    def __init__(self):
        self.mcp_streams = 0
        self.last_emit_at = None
        self.handover_mark = None


class Surfacing:
    """Last-hop state of the sessions of `registry`; the watch reads `store` and publishes
    with `publish(kind, data)`; `member_pubkey(slug)` is a joined mesh's member key."""

    def __init__(self, store, registry, publish, member_pubkey, not_surfaced_after):
        self.store = store
        self.registry = registry
        self.publish = publish
        self.member_pubkey = member_pubkey
        self.not_surfaced_after = not_surfaced_after   # seconds; 0 turns the watch off
        self._states = collections.defaultdict(AgentState)

    def state(self, token):
        return self._states[token]

    def forget(self, info):
        """A session ended: drop its state (registry on_deregister hook)."""
        self._states.pop(info.token, None)

    def stream_opened(self, token):
        self._states[token].mcp_streams += 1

    def stream_closed(self, token):
        state = self._states.get(token)
        if state is not None and state.mcp_streams > 0:
            state.mcp_streams -= 1

    def emitted(self, token, now):
        self._states[token].last_emit_at = now

    def health(self, token):
        """The `mcp` part of a session's daemon.health entry."""
        state = self._states.get(token) or AgentState()
        last = state.last_emit_at
        return {'attached': state.mcp_streams > 0,
                'last_emit_at': iso_from_ms(last) if last is not None else None}

    # -- the not_surfaced watch --------------------------------------------------------

    def check(self, now=None):
        """Warn about rows overdue for their agent; return how many warnings went out."""
        if not self.not_surfaced_after:
            return 0
        now = clock.now_ms() if now is None else now
        cutoff = now - int(self.not_surfaced_after * 1000)
        with self.store.reading():
            rows = Inbox.overdue(cutoff, OVERDUE_BATCH)
        if not rows:
            return 0
        owed = collections.OrderedDict()      # token -> (session, [rows])
        for row in rows:
            for info in self._owners(row):
                owed.setdefault(info.token, (info, []))[1].append(row)
        # Every row looked at is marked, owed or not: a row whose session is gone must not
        # be looked at again at every pass (and hold back the rows behind it).
        self.store.write(Inbox.mark_warned, [row.id for row in rows], now)
        for info, owed_rows in owed.values():
            data = {'event': 'not_surfaced', 'mesh': info.mesh,
                    'session_id': info.session_id, 'token_prefix': info.token_prefix,
                    'display_name': info.display_name, 'count': len(owed_rows),
                    'ids': [row.id for row in owed_rows],
                    'oldest_received_at': iso_from_ms(owed_rows[0].received_at),
                    'mcp_attached': self.health(info.token)['attached'],
                    'hint': 'neither an MCP channel nor a hook has shown these messages to '
                            'the agent; run `meshd install-claude`, or read them with '
                            '`meshd inbox`'}
            log.warning('not_surfaced', extra={'fields': {
                'mesh': info.mesh, 'session': info.token_prefix, 'count': len(owed_rows)}})
            self.publish('warning', data)
        return len(owed)

    def _owners(self, row):
        """The live sessions whose scope holds `row` (spec/daemon.md §8.5)."""
        owners = []
        for info in self.registry.all():
            if info.mesh != row.mesh:
                continue
            if info.presence is None or row.recipient_pubkey == '':
                owners.append(info)
            elif row.recipient_pubkey in (info.session_pubkey, self.member_pubkey(info.mesh)):
                owners.append(info)
        return owners
