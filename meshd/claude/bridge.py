"""The daemon side of `meshd mcp`: which session this bridge is, and its channel stream.

The session (spec/agents.md §1): the one `meshd launch` registered (MESHD_SESSION_TOKEN_FILE),
or one the bridge registers for itself once the client has stayed connected a few seconds
after `initialized` — its own pid, so the reaper ends it with the bridge, which lives exactly
as long as its Claude Code process; a `claude mcp list` health check disconnects sooner and
registers nothing. It is deregistered when stdin closes.

The stream: `events.subscribe` as that session, resumed with `since_seq`/`epoch` after any
disconnect. After a daemon restart (`resync`) and at the first subscription, the rows of the
session that no bridge emitted are emitted first; ids already emitted are skipped, so a burst
during a restart is emitted exactly once, in order. Every message becomes one channel
notification, written before `emitted_at` is recorded: an emit is not delivery. Peer and
shared-data events become short system lines (meshd/claude/render.py), except the session's
own: its own roster changes, and a state value the mesh echoes back after it set it.
"""
import collections
import json
import logging
import os
import secrets
import uuid

import gevent
import gevent.event
from rpc.client import RpcCallError, RpcClient, RpcConnectionError
from rpc.protocol import notification

from meshd import clock, config as config_mod, control, crypto, files, keystore
from meshd.claude import render
from meshd.clock import iso_from_ms
from meshd.exceptions import ConfigError
from meshd.greenlets import LOG

log = logging.getLogger(__name__)

CHANNEL_METHOD = 'notifications/claude/channel'
REMEMBERED_IDS = 10000
REMEMBERED_STATE = 1000
MAX_RETRY_DELAY = 5.0
PREVIEWS = 3


class Identity:
    """The session this bridge speaks for. The token never leaves this process."""

    def __init__(self, token, session_id, mesh, display_name, registered_at, own,
                 pubkey=None):
        self.token = token
        self.session_id = session_id
        self.mesh = mesh
        self.display_name = display_name
        self.registered_at = registered_at
        self.own = own      # registered by this bridge, so deregistered by it
        self.pubkey = pubkey.lower() if isinstance(pubkey, str) else None   # its presence


class Bridge:
    """Finds the session, sends the welcome and streams messages as channel notifications
    through `send(message)` (the stdio peer); greenlets run under `supervisor`."""

    def __init__(self, paths, supervisor, send, timings, mesh=None, environ=None):
        self.paths = paths
        self.supervisor = supervisor
        self.send = send
        self.timings = timings
        self.mesh_flag = mesh
        self.environ = os.environ if environ is None else environ
        self.identity = None
        self.no_session_reason = None
        self.found = gevent.event.Event()       # identity known, or known to be absent
        self._emitted = collections.OrderedDict()
        self._state_known = collections.OrderedDict()   # (mesh, key) → the value as JSON
        self._registration = None   # the sessions.register params, to register again

    # -- the session -------------------------------------------------------------------

    def start(self, client_gone):
        """After `initialized`: find the session, welcome, stream (until `client_gone`)."""
        self.supervisor.spawn('mcp-bridge', self._run, client_gone, on_crash=LOG)

    def _run(self, client_gone):
        try:
            self.identity = self._find(client_gone)
        finally:
            self.found.set()
        if client_gone.is_set():
            return
        self._welcome()
        if self.identity is not None:
            self._stream(client_gone)

    def _find(self, client_gone):
        token_file = self.environ.get('MESHD_SESSION_TOKEN_FILE')
        if token_file:
            return self._launched(token_file, client_gone)
        try:
            config = config_mod.load_config(self.paths.config)
        except ConfigError as exc:
            self.no_session_reason = 'meshd config unreadable: %s' % exc
            return None
        slug, reason = choose_mesh(config, self.mesh_flag or self.environ.get('MESHD_MESH'))
        if slug is None:
            self.no_session_reason = reason
            return None
        # A health check (`claude mcp list`) disconnects at once: register nothing for it.
        if client_gone.wait(self.timings['mcp_register_delay']):
            return None
        return self._register(config_mod.mesh_by_slug(config, slug))

    def _launched(self, token_file, client_gone):
        """The session `meshd launch` registered; while the daemon is not reachable yet
        (starting, restarting), asked again until it answers or the client goes."""
        token = (files.read_text(token_file) or '').strip().lower()
        if not crypto.is_hex64(token):
            self.no_session_reason = 'MESHD_SESSION_TOKEN_FILE holds no session token'
            return None
        delay = self.timings['mcp_reconnect_delay']
        while True:
            try:
                session = self._call_as(token, 'sessions.me')['session']
                break
            except RpcCallError as exc:
                self.no_session_reason = 'the session of meshd launch is gone: %s' % exc
                return None
            except RpcConnectionError as exc:
                log.info('mcp_daemon_unreachable', extra={'fields': {'err': str(exc)}})
                if client_gone.wait(delay):
                    return None
                delay = min(delay * 2, MAX_RETRY_DELAY)
        presence = session.get('presence') or {}
        return Identity(token, session['session_id'], session['mesh'],
                        session['display_name'], session['registered_at'], own=False,
                        pubkey=presence.get('session_pubkey'))

    def _register(self, entry):
        token = secrets.token_hex(32)
        session_id = str(uuid.uuid4())
        display_name = (self.environ.get('MESHD_DISPLAY_NAME')
                        or os.path.basename(os.getcwd()) or 'claude')
        keypair = keystore.load_or_create(self.paths, entry['slug'], session_id)
        presence = crypto.session_presence(entry['pubkey'], entry['secretKey'],
                                           keypair.public_key, keypair.secret_key,
                                           clock.now_ms())
        params = {'token': token, 'session_id': session_id, 'mesh': entry['slug'],
                  'display_name': display_name, 'pid': os.getpid(), 'cwd': os.getcwd(),
                  'presence': presence}
        try:
            self._ensure_daemon()
            with RpcClient(socket_path=self.paths.socket, timeout=5.0) as client:
                answer = client.call('sessions.register', params)
        except (RpcCallError, RpcConnectionError) as exc:
            self.no_session_reason = 'registering a session failed: %s' % exc
            log.warning('mcp_register_failed', extra={'fields': {'err': str(exc)}})
            return None
        log.info('mcp_session_registered', extra={'fields': {
            'session_id': session_id, 'mesh': entry['slug'], 'display_name': display_name}})
        self._registration = params
        return Identity(token, session_id, entry['slug'], display_name,
                        answer['registered_at'], own=True, pubkey=keypair.public_key)

    def stop(self):
        """stdin closed: deregister the session this bridge registered."""
        identity = self.identity
        if identity is None or not identity.own:
            return
        try:
            with RpcClient(socket_path=self.paths.socket, timeout=2.0) as client:
                client.call('sessions.deregister', {'token': identity.token})
        except (RpcCallError, RpcConnectionError):
            pass    # the reaper sees the bridge's pid gone anyway
        log.info('mcp_session_deregistered', extra={'fields': {
            'session_id': identity.session_id}})

    # -- calls as the session ----------------------------------------------------------

    def _ensure_daemon(self):
        state, detail = control.ensure_running(self.paths)
        if state not in ('up', 'started'):
            raise RpcConnectionError('daemon %s: %s' % (state, detail))

    def _call_as(self, token, method, params=None, timeout=5.0):
        self._ensure_daemon()
        with RpcClient(socket_path=self.paths.socket, timeout=timeout) as client:
            client.call('session.attach', {'token': token})
            return client.call(method, params)

    def read_mesh(self):
        """The mesh a read names: the session's, else --mesh or MESHD_MESH, else None (every
        joined mesh), so a read before the session is found asks the mesh it will have."""
        if self.identity is not None:
            return self.identity.mesh
        return self.mesh_flag or self.environ.get('MESHD_MESH') or None

    def call(self, method, params=None, timeout=10.0):
        """`method` as this bridge's session (session-less when it has none)."""
        if self.identity is not None:
            return self._call_as(self.identity.token, method, params, timeout)
        self._ensure_daemon()
        with RpcClient(socket_path=self.paths.socket, timeout=timeout) as client:
            return client.call(method, params)

    # -- what the agent hears ----------------------------------------------------------

    def _channel(self, content, meta):
        written = self.send(notification(CHANNEL_METHOD, {'content': content, 'meta': meta}))
        log.info('channel_emit', extra={'fields': {'ok': written, 'kind': meta.get('kind'),
                                                   'inbox_id': meta.get('inbox_id')}})
        return written

    def _welcome(self):
        identity = self.identity
        if identity is None:
            self._channel('[meshd] this Claude Code session has no mesh identity: %s. Other '
                          'sessions cannot message it; the meshd tools still work.'
                          % (self.no_session_reason or 'no mesh chosen'),
                          {'kind': 'welcome'})
            return
        try:
            peers = self.call('peers.list', {'mesh': identity.mesh})['peers']
            unread = self.call('inbox.list', {'unread_only': True, 'limit': 100})['items']
        except (RpcCallError, RpcConnectionError) as exc:
            log.warning('mcp_welcome_partial', extra={'fields': {'err': str(exc)}})
            peers, unread = [], []
        online = sorted({p.get('displayName') or str(p.get('pubkey'))[:8] for p in peers
                         if p.get('channel') != 'claudemesh-daemon'
                         and p.get('peerRole') != 'control-plane'
                         and p.get('displayName') != identity.display_name})
        lines = ['[meshd] you are "%s" on mesh "%s" (session %s).' % (
            identity.display_name, identity.mesh, identity.session_id[:8])]
        lines.append('%d peer%s online%s' % (len(online), '' if len(online) == 1 else 's',
                                             ': ' + ', '.join(online) if online else '.'))
        if unread:
            lines.append('%d unread message%s; the newest:' % (
                len(unread), '' if len(unread) == 1 else 's'))
            lines += [render.hook_lines(item, limit=200) for item in unread[:PREVIEWS]]
        lines.append('Reply with the send_message tool (to: a name from list_peers), or '
                     '`meshd send <name> <message>`.')
        self._channel('\n'.join(lines), {'kind': 'welcome', 'mesh_slug': identity.mesh,
                                         'session_name': identity.display_name})

    def _emit_row(self, item, client):
        row_id = item.get('id')
        if not row_id or row_id in self._emitted:
            return
        content, meta = render.message_notification(item)
        if not self._channel(content, meta):
            return
        self._emitted[row_id] = True
        while len(self._emitted) > REMEMBERED_IDS:
            self._emitted.popitem(last=False)
        try:
            client.call('inbox.mark_emitted', {'ids': [row_id]})
        except RpcCallError as exc:
            log.warning('mark_emitted_failed', extra={'fields': {'err': str(exc)}})

    def _catch_up(self, client):
        """Emit the session's rows that no bridge emitted since it was registered."""
        since = iso_from_ms(self.identity.registered_at)
        for item in client.call('agent.unemitted', {'since': since})['items']:
            self._emit_row(item, client)

    def _stream(self, client_gone):
        since_seq = epoch = None
        first = True
        quiet = self.timings['mcp_reconnect_delay']
        while not client_gone.is_set():
            try:
                self._ensure_daemon()
                with RpcClient(socket_path=self.paths.socket,
                               timeout=3 * self.timings['events_keepalive']) as client:
                    self._attach(client)
                    params = {'client': 'mcp'}
                    if since_seq is not None:
                        params.update(since_seq=since_seq, epoch=epoch)
                    result = client.call('events.subscribe', params)
                    if first or result['resync'] or since_seq is None:
                        since_seq = result['seq']
                    epoch = result['epoch']
                    if first or result['resync']:
                        self._catch_up(client)
                    first = False
                    for message in client.notifications():
                        if client_gone.is_set():
                            return
                        if message.get('method') != 'event':
                            continue
                        event = message['params']
                        since_seq = max(since_seq or 0, event['seq'])
                        self._on_event(event, client)
            except (RpcConnectionError, RpcCallError, OSError, ValueError) as exc:
                log.info('mcp_stream_lost', extra={'fields': {'err': str(exc)}})
            if client_gone.wait(quiet):
                return

    def _attach(self, client):
        try:
            client.call('session.attach', {'token': self.identity.token})
        except RpcCallError as exc:
            if exc.slug != 'no_session' or not self.identity.own:
                raise
            # The daemon forgot us (its database was reset): register the same session again.
            client.call('sessions.register', self._registration)
            client.call('session.attach', {'token': self.identity.token})

    def _on_event(self, event, client):
        kind, data = event.get('kind'), event.get('data') or {}
        if kind == 'message':
            self._emit_row(data, client)
            return
        if self._own_or_known(kind, data):
            return
        rendered = render.system_notification(kind, data)
        if rendered is not None:
            self._channel(*rendered)

    def note_state(self, mesh, key, value):
        """This session sets `key` to `value` (the state tool; `mesh` None for the default):
        the mesh's echo is not news."""
        self._remember_state((mesh or self.read_mesh(), key), value)

    def _remember_state(self, mesh_key, value):
        """Record the value of a state key; True when it was already the known one."""
        value = json.dumps(value, sort_keys=True)
        known = self._state_known.pop(mesh_key, None) == value
        self._state_known[mesh_key] = value
        while len(self._state_known) > REMEMBERED_STATE:
            self._state_known.popitem(last=False)
        return known

    def _own_or_known(self, kind, data):
        """True for an event the agent need not hear: its own roster change, or a state
        value it set itself or was already told."""
        if kind == 'peer_changed':
            pubkey = data.get('pubkey')
            return (self.identity is not None and self.identity.pubkey is not None
                    and isinstance(pubkey, str) and pubkey.lower() == self.identity.pubkey)
        if kind == 'state_change':
            return self._remember_state((data.get('mesh'), data.get('key')), data.get('value'))
        return False


def choose_mesh(config, requested):
    """(slug, None) for the mesh a bridge's session joins, or (None, why there is none)."""
    slugs = [mesh['slug'] for mesh in config['meshes']]
    if requested:
        if requested in slugs:
            return requested, None
        return None, 'not a member of mesh "%s"' % requested
    if len(slugs) == 1:
        return slugs[0], None
    if not slugs:
        return None, 'no mesh joined (run `meshd join <invite-link>`)'
    return None, ('several meshes joined (%s); add --mesh to the meshd MCP entry or set '
                  'MESHD_MESH' % ', '.join(slugs))
