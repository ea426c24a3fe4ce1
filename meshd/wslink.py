"""Broker links: one WebSocket to a broker, owned with its reconnect loop (spec/daemon.md §5.1).

A link owns its socket from construction: `start()` begins the loop, which never fails
permanently; whichever attempt first reaches `open` carries sends, RPCs and client_acks,
and `close()` stops the loop at any point, even during a backoff wait. Closes and handshake
errors are classified (spec/wire.md §1): a ban stops the link, clock and auth rejections
wait longer, anything else reconnects with jittered backoff. Subclasses build the hello and
filter pushes: MemberLink and SessionLink (meshd/broker_link.py). A link knows only what
its constructor gives it: the mesh, its timings, the supervisor that runs its greenlets,
and `on_open`, called each time it opens (the drain is woken there).
"""
import json
import logging
import random
import struct
import time

import gevent
import gevent.event
import websocket

from meshd.clock import iso_from_ms
from meshd.greenlets import LOG

log = logging.getLogger(__name__)

BACKOFF_STEPS = (1, 2, 4, 8, 16, 30)
PUSH_CONCURRENCY = 32  # pushes stored at once per link; their commits are grouped
STOPPED = object()  # a classification that ends the reconnect loop

# Close reasons of spec/wire.md §1 and what meshd's daemon makes of them.
_CLOCK_REASONS = {'timestamp_skew': 'clock_skew', 'expired': 'auth_failed',
                  'ttl_too_long': 'auth_failed'}
_ENROLMENT_REASONS = {'unauthorized', 'parent_member_id_mismatch'}
_DEFECT_REASONS = {'malformed', 'bad_session_pubkey', 'bad_parent_pubkey',
                   'attestation_mismatch', 'bad_signature'}


class LinkClosed(Exception):
    """The socket closed; `code` and `reason` come from the close frame (1006: none)."""

    def __init__(self, code, reason):
        super().__init__('closed %s %s' % (code, reason))
        self.code = code
        self.reason = reason


class LinkUnavailable(Exception):
    """A request could not be written: the link is not open, or closed before the reply."""


class LinkTimeout(Exception):
    """The broker did not answer a request in time (it may be stopped or overloaded)."""


class Link:
    """The shared lifecycle of member and session links."""

    kind = 'link'
    log_prefix = 'broker_'

    def __init__(self, mesh, url, timings, supervisor, on_open=None):
        self.mesh = mesh
        self.url = url
        self.timings = timings
        self.supervisor = supervisor
        self._on_open = on_open
        self.status = 'closed'
        self.state = 'ok'
        self.detail = None
        self.retry_at = None
        self.in_flight = 0
        self.broker_dm_ttl = None           # seconds the broker keeps an undelivered DM
        self._ws = None
        self._closed = gevent.event.Event()
        self._reconnect_now = gevent.event.Event()
        self._pending = {}       # send id -> AsyncResult of the ack
        self._requests = {}      # _reqId -> AsyncResult of the reply
        self._request_seq = 0
        self._failures = 0
        self._opened = False     # a hello_ack was ever received on this link
        self.broker_features = frozenset()  # meshd extensions the broker announced
        self._last_activity = time.monotonic()
        self._last_error_frame = None
        self._connecting = None
        self._last_code = self._last_reason = None
        self._greenlet = None
        # Pushes are stored concurrently so that the group writer commits them together;
        # a full pool blocks the read loop, which is the backpressure on the broker.
        self._pushes = supervisor.pool(PUSH_CONCURRENCY, 'pushes:%s' % mesh['slug'])

    # -- lifecycle ---------------------------------------------------------------------

    def start(self):
        self._greenlet = self.supervisor.spawn('%s:%s' % (self.kind, self.name), self._run)
        return self

    @property
    def name(self):
        return self.mesh['slug']

    @property
    def is_open(self):
        return self.status == 'open' and self._ws is not None

    @property
    def is_closed(self):
        return self._closed.is_set()

    def health(self):
        return {'status': self.status, 'state': self.state, 'detail': self.detail,
                'retry_at': self.retry_at}

    def close(self, goodbye=False):
        """Stop for good: idempotent, also during a backoff wait. With `goodbye`, a broker
        that speaks the `presence` extension is told first that this presence ends on
        purpose, so it leaves at once instead of after its grace window."""
        if goodbye and 'presence' in self.broker_features and not self.is_closed:
            self.send_frame({'type': 'meshd_goodbye'})
        self._closed.set()
        self._reconnect_now.set()
        self._drop_socket()
        self._fail_pending('daemon_shutdown')
        self._set_status('closed')

    def reconnect_now(self, reason):
        """Drop the socket and reconnect without waiting (a laptop woke up, DESIGN.md 25)."""
        if self.is_closed:
            return
        self._log('info', 'ws_reconnect_now', reason=reason)
        self._failures = 0
        self._reconnect_now.set()
        self._drop_socket()

    def _run(self):
        first = True
        while not self.is_closed:
            delay = self._attempt()
            if delay is STOPPED or self.is_closed:
                self._set_status('closed')
                return
            if first and not self._opened:
                self.on_first_connect_failed(self.detail or self._last_reason or 'closed')
            first = False
            delay *= self.timings['link_backoff_scale']
            self.retry_at = iso_from_ms(int((time.time() + delay) * 1000))
            self._set_status('reconnecting')
            self._log('info', 'ws_reconnect_scheduled', url=self.url,
                      wait_ms=int(delay * 1000), code=self._last_code, reason=self._last_reason)
            self._reconnect_now.clear()
            self._reconnect_now.wait(delay)
        self._set_status('closed')

    def _attempt(self):
        """One connection, from open to close; returns the delay before the next one."""
        self._set_status('connecting')
        self._log('info', 'ws_open_attempt', url=self.url)
        try:
            ws = websocket.create_connection(self.url, timeout=self.timings['link_hello_timeout'],
                                             enable_multithread=True)
        except Exception as exc:
            self.state, self.detail = 'unreachable', str(exc)
            self._log('warning', 'ws_reconnect_failed', url=self.url, err=str(exc))
            return self._next_delay()
        self._last_activity = time.monotonic()
        self._connecting = ws  # close() must be able to end the handshake too
        self._log('info', 'ws_open_ok', url=self.url)
        watchdog = None
        try:
            if self.is_closed:
                raise LinkClosed(1000, 'closed')
            try:
                hello = self.build_hello()
            except Exception as exc:
                self._log('warning', 'ws_build_hello_threw', err=str(exc))
                raise LinkClosed(1006, 'build_hello_failed')
            ws.send(_encode(hello))
            self._log('info', 'ws_hello_sent', url=self.url)
            ack = self._await_hello_ack(ws)
            if self.is_closed:  # closed while the handshake was in flight: never go open
                raise LinkClosed(1000, 'closed')
            self._read_extensions(ack)
            self._ws = ws
            ws.settimeout(None)
            self._failures = 0
            self._opened = True
            self.state, self.detail, self.retry_at = 'ok', None, None
            self._set_status('open')
            self._log('info', 'ws_hello_acked', url=self.url)
            watchdog = self.supervisor.spawn('watchdog:%s' % self.name, self._watchdog, ws,
                                             on_crash=LOG)
            if self._on_open is not None:
                self._on_open()
            self._read_loop(ws)
        except LinkClosed as closed:
            return self._after_close(closed.code, closed.reason)
        except Exception as exc:
            if not self.is_closed:
                self._log('warning', 'ws_error', url=self.url, err=str(exc))
            return self._after_close(1006, str(exc))
        finally:
            if watchdog is not None:
                watchdog.kill(block=False)
            self._ws = None
            self._connecting = None
            try:
                ws.shutdown()
            except Exception:
                pass
        return self._after_close(1006, 'closed')

    def _read_extensions(self, ack):
        """What meshd extensions the broker announced in hello_ack (none: claudemesh)."""
        ext = ack.get('meshdExt')
        features = ext.get('features') if isinstance(ext, dict) else None
        self.broker_features = frozenset(f for f in features or () if isinstance(f, str))
        ttl = ext.get('dmTtlSeconds') if isinstance(ext, dict) else None
        self.broker_dm_ttl = ttl if isinstance(ttl, int) and not isinstance(ttl, bool) else None

    def _await_hello_ack(self, ws):
        deadline = time.monotonic() + self.timings['link_hello_timeout']
        handshake_error = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._log('warning', 'hello_ack_timeout', url=self.url)
                raise LinkClosed(1006, 'hello_ack_timeout')
            ws.settimeout(remaining)
            try:
                frame = self._read_frame(ws)
            except websocket.WebSocketTimeoutException:
                continue
            if frame is None:
                continue
            kind = frame.get('type')
            if kind == 'hello_ack':
                return frame
            if kind == 'error':
                handshake_error = frame.get('code')
                self._last_error_frame = frame
                self.on_handshake_error(frame)
            elif handshake_error is None:
                self._dispatch(frame)

    def _read_loop(self, ws):
        while not self.is_closed:
            frame = self._read_frame(ws)
            if frame is not None:
                self._dispatch(frame)

    def _read_frame(self, ws):
        """The next JSON frame (None for control frames and junk); LinkClosed at the end."""
        try:
            opcode, frame = ws.recv_data_frame(True)
        except websocket.WebSocketTimeoutException:
            raise
        except (websocket.WebSocketConnectionClosedException, OSError, AttributeError) as exc:
            raise LinkClosed(1006, str(exc) or 'connection lost')
        self._last_activity = time.monotonic()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code, reason = 1005, ''
            if frame.data and len(frame.data) >= 2:
                code = struct.unpack('!H', frame.data[:2])[0]
                reason = frame.data[2:].decode('utf-8', 'replace')
            raise LinkClosed(code, reason)
        if opcode not in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            return None
        try:
            message = json.loads(frame.data.decode('utf-8') if isinstance(frame.data, bytes)
                                 else frame.data)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def _watchdog(self, ws):
        interval = self.timings['link_ping_interval']
        while not self._closed.wait(interval):
            idle = time.monotonic() - self._last_activity
            if idle > self.timings['link_stale_after']:
                self._log('warning', 'ws_stale_terminate', url=self.url,
                          idle_ms=int(idle * 1000))
                try:
                    ws.shutdown()
                except Exception:
                    pass
                return
            try:
                ws.ping()
            except Exception:
                return

    def _drop_socket(self):
        for ws in (self._ws, self._connecting):
            if ws is not None:
                try:
                    ws.shutdown()
                except Exception:
                    pass

    # -- classification ----------------------------------------------------------------

    def _after_close(self, code, reason):
        self._last_code, self._last_reason = code, reason
        self._ws = None
        self._fail_pending('broker_disconnected_%s' % code)
        if self.is_closed:
            return STOPPED
        self._log('warning', 'ws_closed', url=self.url, code=code, reason=reason,
                  status=self.status)
        self.on_closed(code, reason)
        error = self._last_error_frame or {}
        self._last_error_frame = None
        verdict = classify_close(code, reason, error.get('code'))
        self.detail = '%s %s' % (code, reason) if reason else str(code)
        if verdict is STOPPED:
            if code == 4002 or error.get('code') == 'revoked':
                self.state = 'banned'
            elif code == 4001:
                self.state = 'kicked'
            else:
                self.state = 'unreachable'  # e.g. a broker without session presence
            return STOPPED
        state, minimum = verdict
        if state is not None:
            self.state = state
        elif self.state != 'unreachable':
            self.state = 'ok'
        return max(minimum, self._next_delay())

    def _next_delay(self):
        step = BACKOFF_STEPS[min(self._failures, len(BACKOFF_STEPS) - 1)]
        self._failures += 1
        return step * random.uniform(0.8, 1.2)

    # -- sends and requests ------------------------------------------------------------

    def send_frame(self, frame):
        """Write one frame now; False when the socket is not open or the write failed."""
        ws = self._ws
        if ws is None or self.status != 'open':
            return False
        try:
            ws.send(_encode(frame))
            return True
        except Exception as exc:
            self._log('warning', 'ws_error', url=self.url, err='ws_write_failed: %s' % exc)
            self._drop_socket()
            return False

    def send_message(self, frame, timeout=None):
        """Send a `send` frame and wait for its ack: {'ok', 'message_id'} or {'ok', 'error'}."""
        key = frame['id']
        waiter = gevent.event.AsyncResult()
        self._pending[key] = waiter
        try:
            if not self.send_frame(frame):
                return {'ok': False, 'error': self.not_open_error, 'transient': True}
            try:
                return waiter.get(timeout=timeout or self.timings['link_ack_timeout'])
            except gevent.Timeout:
                return {'ok': False, 'error': 'ack_timeout', 'transient': True}
        finally:
            self._pending.pop(key, None)

    def request(self, frame, reply_type, timeout=None):
        """Send an RPC-style frame with a _reqId and return the reply (None when unavailable)."""
        try:
            reply = self.call(frame, (reply_type,), timeout)
        except (LinkUnavailable, LinkTimeout):
            return None
        return reply if reply.get('type') == reply_type else None

    def call(self, frame, reply_types, timeout=None):
        """Send `frame` with a fresh _reqId and return the broker's reply: a frame whose type
        is one of `reply_types`, or an `error` frame with that _reqId. Raises LinkUnavailable
        when the link is not open (or the write failed) and LinkTimeout when no reply came
        within `timeout` (default link_rpc_timeout)."""
        if not self.is_open:
            raise LinkUnavailable('%s link is %s' % (self.kind, self.status))
        self._request_seq += 1
        req_id = '%s-%d' % (frame['type'][:2], self._request_seq)
        waiter = gevent.event.AsyncResult()
        self._requests[req_id] = (tuple(reply_types), waiter)
        try:
            if not self.send_frame(dict(frame, _reqId=req_id)):
                raise LinkUnavailable('%s link write failed' % self.kind)
            reply = waiter.get(timeout=timeout or self.timings['link_rpc_timeout'])
        except gevent.Timeout:
            raise LinkTimeout('no %s reply within %gs' % (
                '/'.join(reply_types), timeout or self.timings['link_rpc_timeout']))
        finally:
            self._requests.pop(req_id, None)
        if reply is None:
            raise LinkUnavailable('%s link closed before the reply' % self.kind)
        return reply

    def client_ack(self, client_message_id, broker_message_id):
        frame = {'type': 'client_ack'}
        if client_message_id:
            frame['clientMessageId'] = client_message_id
        if broker_message_id:
            frame['brokerMessageId'] = broker_message_id
        if len(frame) > 1:
            self.send_frame(frame)  # dropped when closed: the broker re-pushes after its lease

    def _fail_pending(self, error):
        for waiter in list(self._pending.values()):
            if not waiter.ready():
                waiter.set({'ok': False, 'error': error, 'transient': True})
        for _reply_types, waiter in list(self._requests.values()):
            if not waiter.ready():
                waiter.set(None)

    def _dispatch(self, frame):
        kind = frame.get('type')
        if kind == 'ack':
            waiter = self._pending.get(frame.get('id'))
            if waiter is not None and not waiter.ready():
                error = frame.get('error')
                if error:
                    waiter.set({'ok': False, 'error': error, 'transient': False})
                else:
                    waiter.set({'ok': True,
                                'message_id': frame.get('messageId') or frame.get('id')})
            return
        req_id = frame.get('_reqId')
        if req_id is not None and req_id in self._requests:
            reply_types, waiter = self._requests[req_id]
            if (kind in reply_types or kind == 'error') and not waiter.ready():
                waiter.set(frame)
            return
        if kind in ('push', 'inbound'):
            self._pushes.spawn(self._handle_push, frame)
            return
        if kind == 'meshd_undelivered':
            self._pushes.spawn(self._handle_notice, frame)
            return
        if kind == 'state_change':
            self._pushes.spawn(self._handle_state_change, frame)
            return
        if kind == 'error':
            self._log('warning', 'broker_error', code=frame.get('code'),
                      message=frame.get('message'))

    def _handle_push(self, frame):
        try:
            self.on_push(frame)
        except Exception:
            log.exception('push handling failed')

    def _handle_state_change(self, frame):
        try:
            self.on_state_change(frame)
        except Exception:
            log.exception('state change handling failed')

    def _handle_notice(self, frame):
        try:
            self.on_undelivered(frame)
        except Exception:
            log.exception('undelivered notice handling failed')

    # -- hooks for subclasses ----------------------------------------------------------

    not_open_error = 'broker_not_open'

    def build_hello(self):
        raise NotImplementedError

    def on_closed(self, code, reason):
        pass

    def on_first_connect_failed(self, error):
        pass

    def on_handshake_error(self, frame):
        pass

    def on_push(self, frame):
        raise NotImplementedError

    def on_undelivered(self, frame):
        pass  # only member links receive the notices of undelivered DMs

    def on_state_change(self, frame):
        pass  # every link of the mesh receives it; the member link tells subscribers

    def _set_status(self, status):
        if status != self.status:
            self.status = status
            self.on_status(status)

    def on_status(self, status):
        pass

    def _log(self, level, msg, **fields):
        fields.setdefault('mesh', self.mesh['slug'])
        log.log(_LEVELS[level], self.log_prefix + msg, extra={'fields': fields})


_LEVELS = {'info': logging.INFO, 'warning': logging.WARNING}


def classify_close(code, reason, error_code=None):
    """STOPPED, or (state or None, minimum delay in seconds) for a close (spec/wire.md §1)."""
    reason = reason or ''
    if code == 4002 or error_code in ('revoked', 'unknown_message_type'):
        return STOPPED
    if code == 4001:
        return STOPPED
    if code == 1000 and reason == 'session_replaced':
        return ('auth_failed', 300)
    key = error_code or (reason if code == 1008 else None)
    if key in _CLOCK_REASONS:
        return (_CLOCK_REASONS[key], 60)
    if key in _ENROLMENT_REASONS or key in _DEFECT_REASONS:
        return ('auth_failed', 300)
    return (None, 0)


def _encode(frame):
    return json.dumps(frame, separators=(',', ':'), ensure_ascii=False)
