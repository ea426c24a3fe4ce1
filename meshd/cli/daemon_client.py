"""The CLI's connection to the daemon: start it when needed, attach the caller's session,
call one method. Failures raise CommandFailed with the line the user reads.

A running daemon is the common case and takes one connection and no import beyond the
standard library's socket and json: control (psutil, subprocess) loads only to tell why the
daemon did not answer and to start one (meshd/entry.py: these commands skip gevent).
"""
import os
import sys

from rpc.client import RpcCallError, RpcClient, RpcConnectionError

from meshd import config as config_mod, files
from meshd.cli.output import invoked_as
from meshd.exceptions import CommandFailed, ConfigError

PROBE_TIMEOUT = 2.5      # control.PROBE_TIMEOUT: how long daemon.version may take to answer


def unreachable(exc, paths, state=None):
    """The failure to reach the daemon, with a hint that names something that exists."""
    if os.path.exists(paths.log):
        hint = 'check %s' % paths.log
    else:
        hint = 'start it with `%s daemon up`' % invoked_as()
    return CommandFailed('✘ daemon not reachable — %s%s (%s)'
                         % ('%s: ' % state if state else '', exc, hint))


def connect(paths, timeout=5.0, spawn=True):
    """A connected RpcClient, the daemon started first when needed (spec/daemon.md §10.2)."""
    client = _answering(paths, timeout)
    if client is not None:
        return client
    from meshd import control
    state, detail = control.ensure_running(paths, allow_spawn=spawn)
    if state == 'started':
        print('[meshd] info daemon started automatically (%s)' % detail, file=sys.stderr)
    elif state == 'busy':
        raise CommandFailed('✘ daemon busy — %s' % detail)
    elif state != 'up':
        raise unreachable(detail, paths, state)
    try:
        return RpcClient(socket_path=paths.socket, timeout=timeout).connect()
    except RpcConnectionError as exc:
        raise unreachable(exc, paths)


def _answering(paths, timeout):
    """A client on the daemon's socket that answered daemon.version (control.probe's
    question, on the connection the command then uses), or None: no socket, no answer, or a
    daemon too busy to take it, which control.ensure_running tells apart."""
    client = RpcClient(socket_path=paths.socket, timeout=timeout)
    try:
        client.connect()
        client.call('daemon.version', timeout=PROBE_TIMEOUT)
        return client
    except (RpcConnectionError, RpcCallError, ValueError):
        client.close()
        return None


def session_token():
    """The session token in the file MESHD_SESSION_TOKEN_FILE names, if it is 64 hex."""
    path = os.environ.get('MESHD_SESSION_TOKEN_FILE')
    if not path:
        return None
    from meshd import crypto       # PyNaCl: only when a session token is to be checked
    token = (files.read_text(path) or '').strip().lower()
    return token if crypto.is_hex64(token) else None


def attach(client):
    """Act as the session of MESHD_SESSION_TOKEN_FILE when there is one (spec/daemon.md
    §10.1); True when attached. (Hooks also find their session through the process tree;
    commands do not, so a shell that started a session does not speak as it by surprise.)"""
    token = session_token()
    if token is None:
        return False
    try:
        client.call('session.attach', {'token': token})
        return True
    except RpcCallError:
        return False  # no_session: the command goes on session-less (spec/daemon.md §10.1)


def call(paths, method, params=None, timeout=5.0, spawn=True):
    """Call one method as the caller's session; its result."""
    client = connect(paths, timeout, spawn=spawn)
    try:
        attach(client)
        return client.call(method, params)
    except RpcCallError as exc:
        raise CommandFailed('%s failed: %s' % (method, exc.error.get('message')))
    except RpcConnectionError as exc:
        raise unreachable(exc, paths)
    finally:
        client.close()


def load_config(paths):
    try:
        return config_mod.load_config(paths.config)
    except ConfigError as exc:
        raise ConfigError('config unreadable: %s' % exc)
