"""The last hop (spec/agents.md §1, docs/local-api.md): what MCP bridges and hooks call.

`inbox.mark_emitted` (a bridge wrote a channel notification), `inbox.mark_surfaced` (the
text provably reached the agent), `agent.unemitted` (rows a bridge missed while away),
`agent.handover` (what a hook hands over), `agent.status` (working/idle for the broker) and
`session.attach_by_pids`, through which a hook finds the session of the Claude Code process
above it. Every row query is confined to the caller's scope and its session's mesh.
"""
import logging

from rpc.protocol import INVALID_REQUEST, NOT_FOUND, RpcError, invalid_params
from storage.models import Inbox

from meshd import clock, procs
from meshd.agent_status import STATUSES
from meshd.api.common import clamp, inbox_scope, iso_to_ms
from meshd.api.mailbox import inbox_item

log = logging.getLogger(__name__)

SURFACED_VIA = ('channel', 'hook', 'tool', 'cli')
HOOK_EVENTS = ('SessionStart', 'UserPromptSubmit', 'PostToolUse', 'Stop')
MAX_IDS = 1000


class AgentMethods:
    """Bridges' and hooks' calls: rows in `store`, sessions of `registry`, last-hop state in
    `surfacing`, hook statuses through `status_reporter`; `member_pubkey(slug)` is a joined
    mesh's member key; `grace()` the seconds a channel emit waits for its confirmation."""

    def __init__(self, store, registry, surfacing, status_reporter, member_pubkey, grace):
        self.store = store
        self.registry = registry
        self.surfacing = surfacing
        self.status_reporter = status_reporter
        self.member_pubkey = member_pubkey
        self.grace = grace

    def handlers(self):
        return [
            ('inbox.mark_emitted', self.inbox_mark_emitted,
             {'session': 'optional', 'result': '{marked}'}),
            ('inbox.mark_surfaced', self.inbox_mark_surfaced,
             {'session': 'optional', 'result': '{marked}'}),
            ('agent.unemitted', self.agent_unemitted,
             {'session': 'required', 'result': '{items:[…]}'}),
            ('agent.handover', self.agent_handover,
             {'session': 'required', 'result': '{items:[…], total, urgent}'}),
            ('agent.status', self.agent_status,
             {'session': 'required', 'result': '{ok, reported}'}),
            ('session.attach_by_pids', self.session_attach_by_pids,
             {'result': '{ok, token_prefix, session_id, mesh, presence, pid}'}),
        ]

    def _ids_in_scope(self, ctx, ids):
        if ids is None or not all(isinstance(i, str) for i in ids):
            raise invalid_params("missing 'ids' (string[])")
        if len(ids) > MAX_IDS:
            raise invalid_params("at most %d 'ids'" % MAX_IDS)
        scope = inbox_scope(ctx, self.member_pubkey)
        if scope is None:
            return ids
        with self.store.reading():
            return Inbox.ids_in_scope(ids, scope)

    def inbox_mark_emitted(self, ctx, ids: list = None):
        """Record that an MCP bridge wrote channel notifications for these rows (not delivery)."""
        ids = self._ids_in_scope(ctx, ids)
        now = clock.now_ms()
        marked = self.store.write(Inbox.mark_emitted, ids, now)
        if ctx.session is not None and ids:
            self.surfacing.emitted(ctx.session.token, now)
        return {'marked': marked}

    def inbox_mark_surfaced(self, ctx, ids: list = None, via: str = None):
        """Record that these rows' text reached the agent `via` channel, hook, tool or cli."""
        if via not in SURFACED_VIA:
            raise invalid_params("'via' must be one of %s" % ', '.join(SURFACED_VIA))
        ids = self._ids_in_scope(ctx, ids)
        return {'marked': self.store.write(Inbox.mark_surfaced, ids, clock.now_ms(), via)}

    def agent_unemitted(self, ctx, since: str = None, limit: int = None):
        """Rows of the session received since `since` that no bridge emitted, oldest first."""
        if since is None:
            raise invalid_params("missing 'since' (ISO time)")
        session = ctx.session
        with self.store.reading():
            rows = Inbox.unemitted(inbox_scope(ctx, self.member_pubkey), session.mesh,
                                   iso_to_ms(since, 'since'), clamp(limit, 500, 1, 1000))
        return {'items': [inbox_item(row) for row in rows]}

    def agent_handover(self, ctx, event: str = None, limit: int = None):
        """The session's rows a hook hands over at `event`, oldest first (not marked)."""
        if event not in HOOK_EVENTS:
            raise invalid_params("'event' must be one of %s" % ', '.join(HOOK_EVENTS))
        session = ctx.session
        state = self.surfacing.state(session.token)
        now = clock.now_ms()
        # PostToolUse runs between tool calls: only what became due since the last hand-over,
        # so a backlog cut at the last prompt is not handed over again and again.
        after = state.handover_mark if event == 'PostToolUse' else None
        with self.store.reading():
            # At Stop, `now` rows come first: one behind a backlog must still be seen.
            rows, total = Inbox.due_to_agent(
                inbox_scope(ctx, self.member_pubkey), session.mesh, now,
                int(self.grace() * 1000), after=after, limit=clamp(limit, 10, 1, 100),
                urgent_first=event == 'Stop')
        urgent = any(row.priority == 'now' for row in rows)
        if event == 'Stop' and not urgent:
            rows = []      # Stop continues the session only for `now` rows
        state.handover_mark = now
        return {'items': [inbox_item(row) for row in rows], 'total': total, 'urgent': urgent}

    def agent_status(self, ctx, status: str = None):
        """Tell the session's broker its agent is working or idle (in the background)."""
        if status not in STATUSES:
            raise invalid_params("'status' must be one of %s" % ', '.join(STATUSES))
        return {'ok': True, 'reported': self.status_reporter.report(ctx.session, status)}

    def session_attach_by_pids(self, ctx, pids: list = None):
        """Attach to the session whose process is, or is a child of, the nearest of `pids`
        (the caller's ancestors, nearest first). Unix socket only."""
        if ctx.conn.transport != 'uds':
            raise RpcError.of(INVALID_REQUEST, 'uds_only', 'only on the Unix socket')
        if (not pids or len(pids) > procs.MAX_ANCESTORS
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in pids)):
            raise invalid_params("'pids' must be 1 to %d process ids" % procs.MAX_ANCESTORS)
        if ctx.conn.peer_pid:
            # Only the caller's real ancestors count: a pid list is a claim, the kernel's
            # answer for the connecting process is a fact.
            real = set(procs.ancestors(ctx.conn.peer_pid)) | {ctx.conn.peer_pid}
            pids = [pid for pid in pids if pid in real]
        info = self._nearest_session(pids)
        if info is None:
            raise RpcError.of(NOT_FOUND, 'no_session', 'no session runs under these processes')
        ctx.conn.session_token = info.token
        return {'ok': True, 'token_prefix': info.token_prefix, 'session_id': info.session_id,
                'mesh': info.mesh, 'presence': info.presence is not None, 'pid': info.pid}

    def _nearest_session(self, pids):
        rank = {pid: index for index, pid in reversed(list(enumerate(pids)))}
        best, best_key = None, None
        for info in self.registry.all():
            places = [rank[pid] for pid in (info.pid, procs.parent_pid(info.pid)) if pid in rank]
            if not places:
                continue
            key = (min(places), -(info.registered_at or 0))   # nearest, then newest
            if best_key is None or key < best_key:
                best, best_key = info, key
        return best
