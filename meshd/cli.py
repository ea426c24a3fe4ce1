"""meshd's command line (argh). Thin: parse, then call the Daemon or the RPC client."""
from gevent import monkey; monkey.patch_all()  # noqa: E702 - before every other import

import json
import os
import signal
import subprocess
import sys
import time

import argh
import psutil
from rpc.client import RpcCallError, RpcClient, RpcConnectionError

from meshd import __version__, config as config_mod, files, fingerprint, log as meshd_log
from meshd.argh_compat import add_group
from meshd.exceptions import ConfigError
from meshd.paths import Paths
from meshd.pidfile import read_running_pid

SPAWN_TIMEOUT = 10.0     # seconds `daemon up` waits for the socket to answer
STOP_TIMEOUT = 15.0      # seconds `daemon down` waits for the process to exit
OUTBOX_STATUS_FLAGS = (('pending', 'pending'), ('inflight', 'inflight'), ('done', 'done'),
                       ('failed', 'dead'), ('aborted', 'aborted'),
                       ('undelivered', 'undelivered'))


# -- helpers ---------------------------------------------------------------------------

def fail(message, code=1):
    """One line on stderr and a non-zero exit: the CLI's only way to report an error."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _print_json(value):
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _report(as_json, value, text, code=None):
    """Print `value` as JSON or `text` for people; then exit with `code` when one is given."""
    if as_json:
        _print_json(value)
    else:
        print(text)
    if code is not None:
        sys.exit(code)


def _client(paths, timeout=5.0, spawn=True):
    """A connection to the daemon, starting it first when needed (spec/daemon.md §10.2)."""
    from meshd import autospawn
    state, detail = autospawn.ensure_daemon(paths, _entry_command(), allow_spawn=spawn)
    if state == 'started':
        print('[meshd] info daemon started automatically (%s)' % detail, file=sys.stderr)
    elif state == 'busy':
        fail('✘ daemon busy — %s' % detail)
    elif state != 'up':
        fail('✘ daemon not reachable — %s: %s (check %s)' % (state, detail, paths.log))
    try:
        client = RpcClient(socket_path=paths.socket, timeout=timeout).connect()
    except RpcConnectionError as exc:
        fail('✘ daemon not reachable — %s (check %s)' % (exc, paths.log))
    return client


def _session_token():
    """The session token from the file named by MESHD_SESSION_TOKEN_FILE, if it is 64 hex."""
    path = os.environ.get('MESHD_SESSION_TOKEN_FILE')
    if not path:
        return None
    token = (files.read_text(path) or '').strip().lower()
    if len(token) == 64 and all(c in '0123456789abcdef' for c in token):
        return token
    return None


def _attach(client):
    token = _session_token()
    if token is None:
        return
    try:
        client.call('session.attach', {'token': token})
    except RpcCallError:
        pass  # no_session: the command goes on session-less, as spec/daemon.md §10.1 says


def _call(paths, method, params=None, timeout=5.0, attach=True):
    client = _client(paths, timeout)
    try:
        if attach:
            _attach(client)
        return client.call(method, params)
    except RpcCallError as exc:
        fail('%s failed: %s' % (method, exc.error.get('message')))
    except RpcConnectionError as exc:
        fail('✘ daemon not reachable — %s (check %s)' % (exc, paths.log))
    finally:
        client.close()


def _load_config(paths):
    try:
        return config_mod.load_config(paths.config)
    except ConfigError as exc:
        fail('config unreadable: %s' % exc, 2)


def _probe(paths, timeout=2.5):
    """daemon.version over the socket, or None when nothing answers."""
    if not os.path.exists(paths.socket):
        return None
    try:
        with RpcClient(socket_path=paths.socket, timeout=timeout) as client:
            return client.call('daemon.version')
    except (RpcConnectionError, RpcCallError, ValueError):
        return None


def _entry_command():
    """How to run this same meshd again (checkout script, console script or zipapp)."""
    script = os.path.abspath(sys.argv[0])
    if os.path.basename(script) == '__main__.py' and os.path.basename(
            os.path.dirname(script)) == 'meshd':
        return [sys.executable, '-m', 'meshd']
    return [sys.executable, script]


def _process_gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- daemon ----------------------------------------------------------------------------

@argh.arg('--foreground', default=False, action='store_true',
          help='run in this process (for service managers and tests)')
@argh.arg('--tcp', default=False, action='store_true', help='force the TCP listener on')
@argh.arg('--no-tcp', default=False, action='store_true', help='turn the TCP listener off')
@argh.arg('--tcp-port', default=None, type=int, help='TCP port on 127.0.0.1 (0 = a free port)')
@argh.arg('--clone-policy', default=None, choices=config_mod.CLONE_POLICIES,
          help='on a host fingerprint mismatch: refuse (default), warn or allow')
@argh.arg('--durability', default=None, choices=config_mod.DURABILITIES,
          help='full (default) or normal: trade the last commits on power loss for speed')
@argh.arg('--public-health', default=False, action='store_true',
          help='answer daemon.health on TCP without auth (for a local health probe)')
@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def up(*, foreground=False, tcp=False, no_tcp=False, tcp_port=None, clone_policy=None,
       durability=None, public_health=False, json=False):
    """Start the daemon (detached unless --foreground); returns once its socket answers."""
    if tcp and no_tcp:
        fail('--tcp and --no-tcp cannot be combined', 2)
    paths = Paths()
    file_config = _load_config(paths)
    try:
        options = config_mod.build_options(
            file_config, tcp='on' if tcp else ('off' if no_tcp else None), tcp_port=tcp_port,
            clone_policy=clone_policy, durability=durability,
            public_health=True if public_health else None)
    except ConfigError as exc:
        fail(str(exc), 2)
    if foreground:
        _run_foreground(paths, options)
    flags = ['--tcp'] if tcp else (['--no-tcp'] if no_tcp else [])
    if tcp_port is not None:
        flags += ['--tcp-port', str(tcp_port)]
    if clone_policy:
        flags += ['--clone-policy', clone_policy]
    if durability:
        flags += ['--durability', durability]
    if public_health:
        flags += ['--public-health']
    _spawn_detached(paths, flags, json)


def _run_foreground(paths, options):
    from meshd.daemon import Daemon
    from meshd.exceptions import DaemonExit
    meshd_log.setup(debug=bool(os.environ.get('MESHD_DEBUG')))
    daemon = Daemon(paths, options)
    try:
        code = daemon.run()
    except DaemonExit as exc:
        if exc.message:
            print(exc.message, file=sys.stderr, flush=True)
        code = exc.code
    sys.stdout.flush()
    sys.exit(code)


def _spawn_detached(paths, flags, as_json):
    running = _probe(paths)
    if running is not None:
        pid = read_running_pid(paths.pid_file)
        _report(as_json, {'ok': True, 'detached': True, 'pid': pid, 'already_running': True},
                'daemon already running (pid %s)' % pid)
        return
    files.ensure_private_dir(paths.daemon_dir)
    log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    env = dict(os.environ, MESHD_NO_AUTOSPAWN='1')
    child = subprocess.Popen(_entry_command() + ['daemon', 'up', '--foreground'] + flags,
                             stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                             start_new_session=True, env=env, close_fds=True)
    os.close(log_fd)
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            tail = (files.read_text(paths.log) or '').strip().splitlines()[-3:]
            if as_json:
                _print_json({'ok': False, 'reason': 'daemon_exited', 'status': code,
                             'log': paths.log})
                sys.exit(code or 1)
            fail('✘ daemon exited with status %d: %s (log: %s)'
                 % (code, ' | '.join(tail) or 'no output', paths.log), code or 1)
        if _probe(paths, timeout=1.0) is not None:
            _report(as_json, {'ok': True, 'detached': True, 'pid': child.pid, 'log': paths.log},
                    '✔ daemon started (pid %d)\n→ log: %s\n→ stop: meshd daemon down'
                    % (child.pid, paths.log))
            return
        time.sleep(0.1)
    if as_json:
        _report(True, {'ok': False, 'reason': 'socket_not_appeared', 'log': paths.log}, '', 1)
    fail('✘ daemon spawn timeout: socket did not answer within %ds (log: %s)'
         % (SPAWN_TIMEOUT, paths.log))


@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def down(*, json=False):
    """Stop the daemon: SIGTERM, then wait for the process to exit."""
    paths = Paths()
    pid = read_running_pid(paths.pid_file)
    if pid is None:
        _report(json, {'stopped': False, 'reason': 'not_running'}, 'daemon: not running')
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as exc:
        fail('daemon: could not signal pid %d: %s' % (pid, exc))
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if _process_gone(pid):
            _report(json, {'stopped': True, 'pid': pid}, 'daemon: stopped (was pid %d)' % pid)
            return
        time.sleep(0.1)
    if json:
        _report(True, {'stopped': False, 'pid': pid, 'reason': 'shutdown_timeout'}, '', 1)
    fail('daemon: pid %d did not exit within %ds' % (pid, STOP_TIMEOUT))


@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def status(*, json=False):
    """Show whether the daemon runs, its version and its health."""
    paths = Paths()
    pid = read_running_pid(paths.pid_file)
    if pid is None:
        _report(json, {'running': False}, 'daemon: not running', code=1)
    try:
        with RpcClient(socket_path=paths.socket, timeout=5.0) as client:
            version = client.call('daemon.version')
            health = client.call('daemon.health')
    except (RpcConnectionError, RpcCallError) as exc:
        _report(json, {'running': True, 'pid': pid, 'ipc_error': str(exc)},
                'daemon: pid %d alive but IPC unreachable (%s)' % (pid, exc), code=1)
    if json:
        _print_json({'running': True, 'pid': pid, 'version': version, 'health': health})
        return
    print('daemon: running (pid %d)' % pid)
    print('socket: %s' % paths.socket)
    print('daemon %s (ipc %s, schema %s)' % (version['daemon_version'], version['ipc_api'],
                                            version['schema_version']))
    if health.get('tcp'):
        print('tcp: %s' % health['tcp'])
    for slug, link in sorted(health.get('brokers', {}).items()):
        print('mesh %s: %s (%s)' % (slug, link.get('status'), link.get('state')))


@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def accept_host(*, json=False):
    """Write a fresh host fingerprint (after moving the daemon directory to a new host)."""
    paths = Paths()
    files.ensure_private_dir(paths.daemon_dir)
    record = fingerprint.write_record(paths.fingerprint, fingerprint.HostIdentity())
    _report(json, {'ok': True, 'fingerprint_prefix': record['fingerprint'][:16]},
            'host fingerprint accepted: %s…' % record['fingerprint'][:16])


# -- raw calls and listings ------------------------------------------------------------

@argh.arg('method', help='the JSON-RPC method, e.g. daemon.health (see rpc.list)')
@argh.arg('params', nargs='?', default=None, help='a JSON object of parameters')
@argh.arg('--tcp', default=False, action='store_true',
          help='go through the TCP listener and authenticate with the local token')
@argh.arg('--tcp-port', default=config_mod.DEFAULT_TCP_PORT, type=int, help='TCP port')
@argh.arg('--no-session', default=False, action='store_true',
          help='do not attach the session of MESHD_SESSION_TOKEN_FILE')
@argh.arg('--timeout', default=5.0, type=float, help='seconds to wait for one answer')
@argh.arg('--no-spawn', default=False, action='store_true',
          help='do not start the daemon when it is not running')
def call(method, params, *, tcp=False, tcp_port=config_mod.DEFAULT_TCP_PORT, no_session=False,
         timeout=5.0, no_spawn=False):
    """Send one raw JSON-RPC request and print the result as JSON."""
    try:
        parsed = json.loads(params) if params is not None else {}
    except ValueError as exc:
        fail('params must be a JSON object: %s' % exc, 2)
    if not isinstance(parsed, dict):
        fail('params must be a JSON object', 2)
    paths = Paths()
    if tcp:
        token = (files.read_text(paths.token) or '').strip()
        client = RpcClient(tcp_address='127.0.0.1:%d' % tcp_port, timeout=timeout)
    else:
        _client(paths, timeout, spawn=not no_spawn).close()  # starts the daemon if needed
        client = RpcClient(socket_path=paths.socket, timeout=timeout)
    try:
        client.connect()
        if tcp:
            client.call('auth', {'token': token})
        if not no_session:
            _attach(client)
        answer = client.request(method, parsed)
        if 'error' in answer:
            print(json.dumps(answer['error'], indent=2, ensure_ascii=False), file=sys.stderr)
            sys.exit(1)
        _print_json(answer.get('result'))
        if method == 'events.subscribe':
            sys.stdout.flush()
            try:
                for message in client.notifications(timeout=None):
                    print(json.dumps(message, ensure_ascii=False), flush=True)
            except KeyboardInterrupt:
                pass
    except RpcCallError as exc:
        print(json.dumps(exc.error, indent=2, ensure_ascii=False), file=sys.stderr)
        sys.exit(1)
    except RpcConnectionError as exc:
        fail('✘ daemon not reachable — %s (check %s)' % (exc, paths.log))
    finally:
        client.close()


@argh.arg('--mesh', default=None, help='only this mesh')
@argh.arg('--limit', default=100, type=int, help='at most this many rows')
@argh.arg('--unread', default=False, action='store_true', help='only unread rows')
@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def inbox(*, mesh=None, limit=100, unread=False, json=False):
    """List received messages (and mark the listed ones seen)."""
    paths = Paths()
    params = {'limit': limit, 'unread_only': unread, 'mark_seen': True}
    if mesh:
        params['mesh'] = mesh
    items = _call(paths, 'inbox.list', params)['items']
    if json:
        _print_json(items)
        return
    print('inbox — %s (%d%s messages)' % (mesh or 'all meshes', len(items),
                                         ' unread' if unread else ''))
    for item in items:
        print(_inbox_heading(item))
        print('  %s' % _inbox_body(item))


def _inbox_heading(item):
    """Who sent a row and how: only a row sealed to us end to end reads as a direct message."""
    sender = '%s (%s)' % (item['sender_name'], item['sender_pubkey'][:8])
    topic = ' (#%s)' % item['topic'] if item.get('topic') else ''
    where = '[%s]%s %s' % (item['mesh'], topic, item['received_at'])
    if item.get('decrypt_failed'):
        return 'undecryptable message claiming to be from %s %s' % (sender, where)
    if item.get('e2e'):
        return 'direct message from %s %s' % (sender, where)
    return 'broadcast from %s (not end-to-end encrypted) %s' % (sender, where)


def _inbox_body(item):
    if item.get('decrypt_failed'):
        return '[could not decrypt]'
    return '[no body]' if item['body'] is None else item['body']


@argh.arg('action', nargs='?', default='list', choices=('list', 'requeue'),
          help='list (default) or requeue')
@argh.arg('row_id', nargs='?', default=None, help='the row to requeue')
@argh.arg('--pending', default=False, action='store_true', help='only pending rows')
@argh.arg('--inflight', default=False, action='store_true', help='only inflight rows')
@argh.arg('--done', default=False, action='store_true', help='only delivered rows')
@argh.arg('--failed', default=False, action='store_true', help='only dead rows')
@argh.arg('--aborted', default=False, action='store_true', help='only aborted rows')
@argh.arg('--undelivered', default=False, action='store_true',
          help='only rows the broker reported undelivered')
@argh.arg('--new-client-id', default=None, help='client_message_id of the requeued copy')
@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def outbox(action, row_id, *, pending=False, inflight=False, done=False, failed=False,
           aborted=False, undelivered=False, new_client_id=None, json=False):
    """List outbox rows, or requeue one (outbox requeue ID)."""
    paths = Paths()
    if action == 'requeue':
        if not row_id:
            fail('usage: meshd outbox requeue ID [--new-client-id ID]', 2)
        params = {'id': row_id}
        if new_client_id:
            params['new_client_message_id'] = new_client_id
        client = _client(paths)
        try:
            result = client.call('outbox.requeue', params)
        except RpcCallError as exc:
            fail('requeue failed (%s): %s' % (exc.slug, exc.error.get('message')))
        finally:
            client.close()
        if json:
            _print_json(result)
        else:
            print('requeued: aborted %s → new %s (client_message_id=%s)'
                  % (result['aborted_row_id'], result['new_row_id'],
                     result['new_client_message_id']))
        return
    chosen = dict(pending=pending, inflight=inflight, done=done, failed=failed, aborted=aborted,
                  undelivered=undelivered)
    params = {}
    for flag, status_name in OUTBOX_STATUS_FLAGS:
        if chosen[flag]:
            params['status'] = status_name
    items = _call(paths, 'outbox.list', params)['items']
    if json:
        _print_json(items)
        return
    if not items:
        print('(empty)')
    for item in items:
        line = '%-8s %s  cid=%s  attempts=%d' % (item['status'], item['id'],
                                                 item['client_message_id'], item['attempts'])
        if item.get('broker_message_id'):
            line += ' → %s' % item['broker_message_id']
        if item.get('last_error'):
            line += ' last_error="%s"' % item['last_error'][:60]
        print(line)


@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def sessions(*, json=False):
    """List the sessions registered with the daemon."""
    paths = Paths()
    rows = _call(paths, 'sessions.list')['sessions']
    if json:
        _print_json(rows)
        return
    if not rows:
        print('(no sessions)')
    for row in rows:
        presence = row['presence']['session_pubkey'][:16] + '…' if row['presence'] else '-'
        print('%s  %-20s mesh=%s pid=%d key=%s' % (row['token_prefix'], row['display_name'],
                                                  row['mesh'], row['pid'], presence))


# -- messaging -------------------------------------------------------------------------

@argh.arg('to', help='recipient: 64-hex key, hex prefix, display name, @group, * or @all')
@argh.arg('message', nargs='+', help='the message; - reads it from stdin')
@argh.arg('--mesh', default=None, help='the mesh to send on')
@argh.arg('--priority', default=None, choices=('now', 'next', 'low'), help='delivery priority')
@argh.arg('--ttl', default=None, type=int, help='seconds the message may wait (default 7 days)')
@argh.arg('--client-message-id', default=None, help='idempotency key (a retry reuses it)')
@argh.arg('--no-spawn', default=False, action='store_true',
          help='do not start the daemon when it is not running')
@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def send(to, *message, mesh=None, priority=None, ttl=None, client_message_id=None,
         no_spawn=False, json=False):
    """Send a message; it is durable in the outbox when this returns."""
    text = ' '.join(message)
    if text == '-':
        text = sys.stdin.read()
    if not to.strip() or not text:
        fail('Usage: meshd send <to> <message…>')
    params = {'to': to, 'message': text}
    for key, value in (('mesh', mesh), ('priority', priority), ('ttl', ttl),
                       ('client_message_id', client_message_id)):
        if value is not None:
            params[key] = value
    paths = Paths()
    client = _client(paths, timeout=8.0, spawn=not no_spawn)
    try:
        _attach(client)
        result = client.call('send', params)
    except RpcCallError as exc:
        _send_failed(exc, to, mesh, json)
    except RpcConnectionError as exc:
        fail('✘ daemon not reachable — %s (check %s)' % (exc, paths.log))
    finally:
        client.close()
    message_id = result.get('broker_message_id') or result['client_message_id']
    if json:
        _print_json({'ok': True, 'messageId': message_id, 'target': result['target_spec'],
                     'via': 'daemon', 'duplicate': result['duplicate'],
                     'status': result['status'], 'recipientOnline': result['recipient_online'],
                     'expiresAt': result['expires_at'],
                     'brokerDmTtl': result.get('broker_dm_ttl')})
        return
    target = result.get('recipient_name') or result['target_spec'][:16] + '…'
    broker_ttl = result.get('broker_dm_ttl')
    if result['recipient_online'] is False and broker_ttl:
        print('⚠ queued for %s — no connected peer matches this key on "%s"; its broker keeps '
              'it %s, then `meshd outbox` shows it undelivered.'
              % (target, result['mesh'], _seconds_text(broker_ttl)))
    elif result['recipient_online'] is False:
        print('⚠ queued for %s — no connected peer matches this key on "%s"; it waits until %s.'
              % (target, result['mesh'], result['expires_at']))
    elif result['recipient_online']:
        print('✔ sent to %s (%s…) (online)  %s' % (target, result['target_spec'][:16],
                                                  message_id[:8]))
    else:
        print('✔ sent to %s (daemon)  %s' % (to, message_id[:8]))


def _seconds_text(seconds):
    for unit, size, name in (('d', 86400, 'days'), ('h', 3600, 'hours'), ('m', 60, 'minutes')):
        if seconds >= size:
            return '%g %s' % (round(seconds / size, 1), name)
    return '%d seconds' % seconds


def _send_failed(exc, to, mesh, as_json):
    if as_json:
        _print_json({'ok': False, 'error': exc.error.get('message'), 'code': exc.slug,
                     'via': 'daemon'})
        sys.exit(1)
    data = exc.data
    lines = [exc.error.get('message')]
    if exc.slug == 'peer_not_found':
        lines.append('Check `meshd peers` (add --mesh <slug> to scope).')
    elif exc.slug in ('mesh_required', 'ambiguous') and data.get('candidates'):
        lines.append('candidates: ' + ', '.join(
            '%s %s… @%s' % (c.get('display_name'), (c.get('pubkey') or '')[:12], c.get('mesh'))
            for c in data['candidates']))
    elif exc.slug == 'mesh_required':
        lines.append('joined meshes: %s — pick one with --mesh' % ', '.join(
            data.get('attached') or data.get('meshes') or []))
    print('\n'.join('send failed (daemon): %s' % lines[0:1][0] if i == 0 else line
                    for i, line in enumerate(lines)), file=sys.stderr)
    sys.exit(1)


@argh.arg('--mesh', default=None, help='only this mesh')
@argh.arg('--all', default=False, action='store_true', help='also show daemon (control-plane) rows')
@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def peers(*, mesh=None, all=False, json=False):  # noqa: A002 - the flag is --all
    """List the peers of your meshes."""
    paths = Paths()
    params = {'mesh': mesh} if mesh else {}
    result = _call(paths, 'peers.list', params)
    rows = [p for p in result['peers'] if all or p.get('peerRole') != 'control-plane']
    if json:
        _print_json(rows)
        return
    by_mesh = {}
    for peer in rows:
        by_mesh.setdefault(peer['mesh'], []).append(peer)
    hidden = len(result['peers']) - len(rows)
    for slug in sorted(by_mesh) or ['(none)']:
        group = by_mesh.get(slug, [])
        print('peers on %s (%d%s)' % (slug, len(group),
                                      ', %d control-plane hidden — use --all' % hidden
                                      if hidden else ''))
        for peer in group:
            print('● %s · %s… · %s' % (peer.get('displayName'), str(peer.get('pubkey'))[:16],
                                        peer.get('status')))
    for slug in result.get('unreachable', []):
        print('mesh %s: broker unreachable' % slug)


# -- meshes ----------------------------------------------------------------------------

@argh.arg('link', help='the invite link (ic://join/…)')
@argh.arg('--name', default=None, help='your display name on this mesh')
@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
def join(link, *, name=None, json=False):
    """Join a mesh with an invite link; a running daemon attaches it at once."""
    from meshd import membership
    from meshd.exceptions import MeshdError
    paths = Paths()
    try:
        entry, warnings, reloaded = membership.join(paths, link, name)
    except MeshdError as exc:
        fail('✘ join failed: %s' % exc, 2 if isinstance(exc, ConfigError) else 1)
    for warning in warnings:
        print(warning, file=sys.stderr)
    if json:
        _print_json({'ok': True, 'mesh': entry, 'daemon_reloaded': reloaded is not None})
    else:
        print('✔ joined %s' % entry['slug'])


@argh.arg('slug', help='the mesh to leave')
def leave(slug):
    """Leave a mesh (removes it from config.json; a running daemon detaches it)."""
    from meshd import membership
    from meshd.exceptions import MeshdError
    try:
        membership.leave(Paths(), slug)
    except MeshdError as exc:
        fail(str(exc), 2 if isinstance(exc, ConfigError) else 1)
    print('✔ left %s' % slug)


@argh.arg('path', nargs='?', default=None,
          help='claudemesh config.json (default ~/.claudemesh/config.json)')
def import_claudemesh(path):
    """Copy the meshes of a claudemesh config into meshd's config."""
    from meshd import membership
    from meshd.exceptions import MeshdError
    source = path or os.path.join(os.path.expanduser('~'), '.claudemesh', 'config.json')
    try:
        slugs, _reloaded = membership.import_claudemesh(Paths(), source)
    except MeshdError as exc:
        fail(str(exc))
    print('✔ imported %s' % ', '.join(slugs))


@argh.arg('command', nargs='*', help='the agent to run (default: claude), after --')
@argh.arg('--name', default=None, help='display name of the session')
@argh.arg('--mesh', default=None, help='the mesh to bind the session to')
@argh.arg('--role', default=None, help='role shown to peers')
@argh.arg('--groups', default=None, help='groups NAME[:ROLE],…')
@argh.arg('--resume', default=None, help='the session UUID to resume (keeps its keypair)')
def launch(*command, name=None, mesh=None, role=None, groups=None, resume=None):
    """Run an agent as a registered session until it exits."""
    from meshd import launch as launch_mod
    from meshd.exceptions import MeshdError
    paths = Paths()
    try:
        status_code = launch_mod.run(paths, list(command) or ['claude'], mesh=mesh, name=name,
                                     role=role, groups=groups, resume=resume,
                                     out=lambda line: print(line, file=sys.stderr),
                                     ensure=lambda: _client(paths).close())
    except MeshdError as exc:
        fail('✘ launch: %s' % exc, 2 if isinstance(exc, ConfigError) else 1)
    sys.exit(status_code)


def quickstart():
    """Start a local broker and two daemons (alice, bob) and send a DM between them."""
    from meshd import quickstart as quickstart_mod
    sys.exit(quickstart_mod.main(_entry_command(), Paths().home))


# -- assembly --------------------------------------------------------------------------

def build_parser():
    parser = argh.ArghParser(prog='meshd', description='meshd: messages between agent '
                             'sessions across machines, through a claudemesh-protocol broker.')
    parser.add_argument('--version', action='version', version='meshd %s' % __version__)
    from meshd.broker import cli as broker_cli
    parser.add_commands([quickstart, send, peers, inbox, outbox, sessions, call, join, leave,
                         import_claudemesh, launch, broker_cli.broker])
    from meshd.service import install_service
    add_group(parser, 'daemon', [up, down, status, accept_host, install_service],
              'run and control the daemon')
    add_group(parser, 'broker-admin', broker_cli.ADMIN_COMMANDS,
              "administer a meshd broker's database")
    return parser


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ['broker']:
        meshd_log.setup(debug=bool(os.environ.get('MESHD_DEBUG')))
    parser = build_parser()
    try:
        parser.dispatch(argv=argv)
    except KeyboardInterrupt:
        sys.exit(130)
