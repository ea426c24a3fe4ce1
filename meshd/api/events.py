"""events.subscribe: the event stream, resumable by seq within an epoch (spec/daemon.md §8.4)."""
import gevent.queue
from rpc.connection import Stream
from rpc.protocol import INVALID_REQUEST, RpcError, invalid_params, notification

STREAM_BACKLOG = 256  # events queued for a subscriber that stopped reading before its stream ends


class EventMethods:
    """Streams of `bus` (meshd/bus.py), scoped to the attached session; keepalives every
    `keepalive` seconds; `member_pubkey(slug)` is the member key of a joined mesh;
    `surfacing` counts the streams of MCP bridges (daemon.health's `mcp.attached`)."""

    def __init__(self, bus, keepalive, member_pubkey, surfacing=None):
        self.bus = bus
        self.keepalive = keepalive
        self.member_pubkey = member_pubkey
        self.surfacing = surfacing

    def handlers(self):
        return [('events.subscribe', self.events_subscribe,
                 {'session': 'optional', 'stream': True,
                  'result': '{epoch, seq, replayed, resync}'})]

    def events_subscribe(self, ctx, since_seq: int = None, epoch: str = None,
                         client: str = None):
        """Stream events as notifications; resume after `since_seq` within the same epoch.
        `client: "mcp"` marks an MCP bridge's stream (daemon.health shows it attached)."""
        bus = self.bus
        if ctx.conn.stream is not None:
            raise RpcError.of(INVALID_REQUEST, 'invalid_request', 'already subscribed')
        if since_seq is not None and epoch is None:
            raise invalid_params('since_seq requires epoch')
        session = ctx.session
        bridge_token = (session.token if client == 'mcp' and session is not None
                        and self.surfacing is not None else None)
        accept = event_filter(session, self.member_pubkey(session.mesh) if session else None)
        queue = gevent.queue.Queue(maxsize=STREAM_BACKLOG)
        overflowed = []

        def on_event(event):
            if not accept(event):
                return
            try:
                queue.put_nowait(event)
            except gevent.queue.Full:
                # A subscriber that stopped reading must not hold every later event in
                # memory: its stream ends, and the client resumes (or resyncs) from its seq.
                overflowed.append(True)
                unsubscribe()
        # Subscribe before reading the log, so nothing published meanwhile falls in a gap.
        unsubscribe_bus = bus.subscribe(on_event)
        if bridge_token is not None:
            self.surfacing.stream_opened(bridge_token)
        ended = []

        def unsubscribe():
            if ended:
                return
            ended.append(True)
            unsubscribe_bus()
            if bridge_token is not None:
                self.surfacing.stream_closed(bridge_token)
        oldest, newest = bus.bounds()
        replay, resync = [], False
        if since_seq is not None:
            lost = oldest is not None and since_seq + 1 < oldest
            if epoch != bus.epoch or lost:
                resync = True
            else:
                replay = [event for event in bus.replay(since_seq) if accept(event)]
        result = {'epoch': bus.epoch, 'seq': newest, 'replayed': len(replay), 'resync': resync}
        keepalive = self.keepalive

        def run(conn):
            try:
                # Live events at or below this bound were replayed (or predate the
                # subscription). They can be delivered out of seq order (each is handed over
                # after its own commit), so the bound stays fixed instead of following the
                # last event sent.
                bound = (replay[-1]['seq'] if replay
                         else (newest if since_seq is None else since_seq))
                for event in replay:
                    if not conn.send(notification('event', event)):
                        return
                while not conn.closed.is_set() and not conn.stopping.is_set():
                    if overflowed:
                        conn.close()
                        return
                    try:
                        event = queue.get(timeout=keepalive)
                    except gevent.queue.Empty:
                        params = {'epoch': bus.epoch, 'seq': bus.bounds()[1]}
                        if not conn.send(notification('keepalive', params)):
                            return
                        continue
                    if event['seq'] <= bound:
                        continue
                    if not conn.send(notification('event', event)):
                        return
            finally:
                unsubscribe()
        return Stream(result, run, cancel=unsubscribe)


def event_filter(session, member_pubkey):
    """The per-session filter of spec/daemon.md §8.4; None session means no filter."""
    if session is None:
        return lambda event: True
    session_pubkey = (session.session_pubkey or '').lower() or None
    mesh_slug = session.mesh
    member = (member_pubkey or '').lower() or None

    def accept(event):
        data = event['data'] if isinstance(event.get('data'), dict) else {}
        if isinstance(data.get('mesh'), str) and data['mesh'] != mesh_slug:
            return False
        if event['kind'] != 'message':
            return True
        kind, recipient = data.get('recipient_kind'), data.get('recipient_pubkey')
        if not kind or not recipient:
            return True
        if kind == 'session':
            return session_pubkey is not None and recipient.lower() == session_pubkey
        if kind == 'member':
            return member is not None and recipient.lower() == member
        return True
    return accept
