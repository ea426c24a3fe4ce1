"""Commands that talk to the daemon about messages: send, inbox, outbox, sessions, peers, and
`call` for any method by name."""
import json
import sys

from meshd.argh_compat import arg
from rpc.client import RpcCallError, RpcClient, RpcConnectionError

from meshd import config as config_mod, files
from meshd.cli import daemon_client
from meshd.cli.output import print_json, seconds_text
from meshd.exceptions import RUNTIME, USAGE, CommandFailed, UsageError
from meshd.paths import Paths

OUTBOX_STATUS_FLAGS = (('pending', 'pending'), ('inflight', 'inflight'), ('done', 'done'),
                       ('failed', 'dead'), ('aborted', 'aborted'),
                       ('undelivered', 'undelivered'))


@arg('method', help='the JSON-RPC method, e.g. daemon.health (see rpc.list)')
@arg('params', nargs='?', default=None, help='a JSON object of parameters; - reads it from stdin')
@arg('--tcp', default=False, action='store_true',
          help='go through the TCP listener and authenticate with the local token')
@arg('--tcp-port', default=config_mod.DEFAULT_TCP_PORT, type=int, help='TCP port')
@arg('--no-session', default=False, action='store_true',
          help='do not attach the session of MESHD_SESSION_TOKEN_FILE')
@arg('--timeout', default=5.0, type=float, help='seconds to wait for one answer')
@arg('--no-spawn', default=False, action='store_true',
          help='do not start the daemon when it is not running')
def call(method, params, *, tcp=False, tcp_port=config_mod.DEFAULT_TCP_PORT, no_session=False,
         timeout=5.0, no_spawn=False):
    """Send one raw JSON-RPC request and print the result as JSON."""
    if params == '-':
        params = sys.stdin.read()
    try:
        parsed = json.loads(params) if params is not None else {}
    except ValueError as exc:
        raise UsageError('params must be a JSON object: %s' % exc)
    if not isinstance(parsed, dict):
        raise UsageError('params must be a JSON object')
    paths = Paths()
    if tcp:
        token = (files.read_text(paths.token) or '').strip()
        client = RpcClient(tcp_address='127.0.0.1:%d' % tcp_port, timeout=timeout)
    else:
        daemon_client.connect(paths, timeout, spawn=not no_spawn).close()  # start it if needed
        client = RpcClient(socket_path=paths.socket, timeout=timeout)
    try:
        client.connect()
        if tcp:
            client.call('auth', {'token': token})
        if not no_session:
            daemon_client.attach(client)
        answer = client.request(method, parsed)
        if 'error' in answer:
            raise CommandFailed(json.dumps(answer['error'], ensure_ascii=False))
        print_json(answer.get('result'))
        if method == 'events.subscribe':
            sys.stdout.flush()
            try:
                for message in client.notifications(timeout=None):
                    print(json.dumps(message, ensure_ascii=False), flush=True)
            except KeyboardInterrupt:
                pass
    except RpcCallError as exc:
        raise CommandFailed(json.dumps(exc.error, ensure_ascii=False))
    except RpcConnectionError as exc:
        raise daemon_client.unreachable(exc, paths)
    finally:
        client.close()


@arg('--mesh', default=None, help='only this mesh')
@arg('--limit', default=100, type=int, help='at most this many rows')
@arg('--unread', default=False, action='store_true', help='only unread rows')
@arg('--peek', default=False, action='store_true', help='leave the listed rows unread')
@arg('--json', default=False, action='store_true', help='machine-readable output')
@arg('--no-spawn', default=False, action='store_true',
     help='do not start the daemon when it is not running')
def inbox(*, mesh=None, limit=100, unread=False, peek=False, json=False, no_spawn=False):
    """List received messages, then mark the listed ones read (not with --peek)."""
    paths = Paths()
    params = {'limit': limit, 'unread_only': unread}
    if mesh:
        params['mesh'] = mesh
    client = daemon_client.connect(paths, spawn=not no_spawn)
    try:
        attached = daemon_client.attach(client)
        items = client.call('inbox.list', params)['items']
        if json:
            print_json(items)
        else:
            print('inbox — %s (%d%s messages)' % (mesh or 'all meshes', len(items),
                                                 ' unread' if unread else ''))
            for item in items:
                print(_inbox_heading(item))
                print('  %s' % _inbox_body(item))
                print('  %s' % _inbox_reach(item))
        # Marked once printed: a reader that went away (`| head -1`) read nothing, and
        # flush raises before anything is marked.
        sys.stdout.flush()
        ids = [item['id'] for item in items]
        if ids and not peek:
            client.call('inbox.mark_seen', {'ids': ids})
            if attached:
                # Run by an agent as its session: what it read reached it (spec/agents.md §1).
                client.call('inbox.mark_surfaced', {'ids': ids, 'via': 'cli'})
    except RpcCallError as exc:
        raise CommandFailed('inbox.list failed: %s' % exc.error.get('message'))
    except RpcConnectionError as exc:
        raise daemon_client.unreachable(exc, paths)
    finally:
        client.close()


def _inbox_reach(item):
    """How the row reached the agent of its session, if it did."""
    if item.get('surfaced_at'):
        how = {'channel': 'by MCP channel', 'hook': 'by hook', 'tool': 'by MCP tool',
               'cli': 'by `meshd inbox`'}.get(item.get('surfaced_via'), item.get('surfaced_via'))
        return 'reached the agent %s at %s' % (how, item['surfaced_at'])
    if item.get('emitted_at'):
        return 'sent to the agent by MCP channel at %s, not yet confirmed' % item['emitted_at']
    return 'not yet shown to an agent'


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


@arg('action', nargs='?', default='list', choices=('list', 'requeue'),
          help='list (default) or requeue')
@arg('row_id', nargs='?', default=None, help='the row to requeue')
@arg('--pending', default=False, action='store_true', help='only pending rows')
@arg('--inflight', default=False, action='store_true', help='only inflight rows')
@arg('--done', default=False, action='store_true', help='only delivered rows')
@arg('--failed', default=False, action='store_true', help='only dead rows')
@arg('--aborted', default=False, action='store_true', help='only aborted rows')
@arg('--undelivered', default=False, action='store_true',
          help='only rows the broker reported undelivered')
@arg('--new-client-id', default=None, help='client_message_id of the requeued copy')
@arg('--json', default=False, action='store_true', help='machine-readable output')
@arg('--no-spawn', default=False, action='store_true',
     help='do not start the daemon when it is not running')
def outbox(action, row_id, *, pending=False, inflight=False, done=False, failed=False,
           aborted=False, undelivered=False, new_client_id=None, json=False, no_spawn=False):
    """List outbox rows, or requeue one (outbox requeue ID)."""
    paths = Paths()
    if action == 'requeue':
        if not row_id:
            raise UsageError('usage: meshd outbox requeue ID [--new-client-id ID]')
        params = {'id': row_id}
        if new_client_id:
            params['new_client_message_id'] = new_client_id
        client = daemon_client.connect(paths, spawn=not no_spawn)
        try:
            result = client.call('outbox.requeue', params)
        except RpcCallError as exc:
            raise CommandFailed('requeue failed (%s): %s' % (exc.slug, exc.error.get('message')))
        finally:
            client.close()
        if json:
            print_json(result)
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
    items = daemon_client.call(paths, 'outbox.list', params, spawn=not no_spawn)['items']
    if json:
        print_json(items)
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


@arg('--json', default=False, action='store_true', help='machine-readable output')
@arg('--no-spawn', default=False, action='store_true',
     help='do not start the daemon when it is not running')
def sessions(*, json=False, no_spawn=False):
    """List the sessions registered with the daemon."""
    paths = Paths()
    rows = daemon_client.call(paths, 'sessions.list', spawn=not no_spawn)['sessions']
    if json:
        print_json(rows)
        return
    if not rows:
        print('(no sessions)')
    for row in rows:
        presence = row['presence']['session_pubkey'][:16] + '…' if row['presence'] else '-'
        print('%s  %-20s mesh=%s pid=%d key=%s' % (row['token_prefix'], row['display_name'],
                                                  row['mesh'], row['pid'], presence))


# -- messaging -------------------------------------------------------------------------

@arg('to', help='recipient: 64-hex key, hex prefix, display name, @group, * or @all')
@arg('message', nargs='+', help='the message; - reads it from stdin')
@arg('--mesh', default=None, help='the mesh to send on')
@arg('--priority', default=None, choices=('now', 'next', 'low'), help='delivery priority')
@arg('--ttl', default=None, type=int, help='seconds the message may wait (default 7 days)')
@arg('--client-message-id', default=None, help='idempotency key (a retry reuses it)')
@arg('--no-spawn', default=False, action='store_true',
          help='do not start the daemon when it is not running')
@arg('--json', default=False, action='store_true', help='machine-readable output')
def send(to, *message, mesh=None, priority=None, ttl=None, client_message_id=None,
         no_spawn=False, json=False):
    """Send a message; it is durable in the outbox when this returns."""
    text = ' '.join(message)
    if text == '-':
        text = sys.stdin.read()
    if not to.strip():
        raise UsageError('meshd send: the recipient is empty')
    if not text:
        raise UsageError('meshd send: the message is empty')
    params = {'to': to, 'message': text}
    for key, value in (('mesh', mesh), ('priority', priority), ('ttl', ttl),
                       ('client_message_id', client_message_id)):
        if value is not None:
            params[key] = value
    paths = Paths()
    client = daemon_client.connect(paths, timeout=8.0, spawn=not no_spawn)
    try:
        daemon_client.attach(client)
        result = client.call('send', params)
    except RpcCallError as exc:
        _send_failed(exc, json)
    except RpcConnectionError as exc:
        raise daemon_client.unreachable(exc, paths)
    finally:
        client.close()
    message_id = result.get('broker_message_id') or result['client_message_id']
    if json:
        print_json({'ok': True, 'messageId': message_id, 'target': result['target_spec'],
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
              % (target, result['mesh'], seconds_text(broker_ttl)))
    elif result['recipient_online'] is False:
        print('⚠ queued for %s — no connected peer matches this key on "%s"; it waits until %s.'
              % (target, result['mesh'], result['expires_at']))
    elif result['recipient_online']:
        print('✔ sent to %s (%s…) (online)  %s' % (target, result['target_spec'][:16],
                                                  message_id[:8]))
    else:
        print('✔ sent to %s (daemon)  %s' % (to, message_id[:8]))


def _send_failed(exc, as_json):
    """Raise the failure of `send` with what the user can do about it."""
    if as_json:
        print_json({'ok': False, 'error': exc.error.get('message'), 'code': exc.slug,
                    'via': 'daemon'})
        raise CommandFailed('')
    data = exc.data
    hint = ''
    if exc.slug == 'peer_not_found':
        hint = '; see `meshd peers --all`'
    elif exc.slug in ('mesh_required', 'ambiguous') and data.get('candidates'):
        hint = '; candidates: ' + ', '.join(
            '%s %s… @%s' % (c.get('display_name'), (c.get('pubkey') or '')[:12], c.get('mesh'))
            for c in data['candidates'])
    elif exc.slug == 'mesh_required':
        hint = '; joined meshes: %s — pick one with --mesh' % ', '.join(
            data.get('attached') or data.get('meshes') or [])
    usage = exc.slug in ('invalid_params', 'invalid_target', 'mesh_not_attached',
                         'payload_too_large')
    raise CommandFailed('send failed: %s%s' % (exc.error.get('message'), hint),
                        USAGE if usage else RUNTIME)


@arg('--mesh', default=None, help='only this mesh')
@arg('--all', default=False, action='store_true',
          help='also list members seen before who are offline now')
@arg('--json', default=False, action='store_true', help='machine-readable output')
@arg('--no-spawn', default=False, action='store_true',
     help='do not start the daemon when it is not running')
def peers(*, mesh=None, all=False, json=False, no_spawn=False):  # noqa: A002 - it is --all
    """List the peers of your meshes."""
    paths = Paths()
    params = {'mesh': mesh} if mesh else {}
    result = daemon_client.call(paths, 'peers.list', params, spawn=not no_spawn)
    rows = result['peers']
    offline = result.get('offline', []) if all else []
    if json:
        print_json(rows + offline)
        return
    by_mesh = {}
    for peer in rows + offline:
        by_mesh.setdefault(peer['mesh'], []).append(peer)
    for slug in sorted(by_mesh) or ['(none)']:
        group = by_mesh.get(slug, [])
        gone = sum(1 for peer in group if peer.get('offline'))
        print('peers on %s (%d online%s)' % (slug, len(group) - gone,
                                            ', %d offline' % gone if gone else ''))
        for peer in group:
            print(_peer_line(peer))
    for slug in result.get('unreachable', []):
        print('mesh %s: broker unreachable' % slug)


def _peer_line(peer):
    """`● name · key… · status · what it is`: a member (its daemon; a DM to its name lands
    in that daemon's inbox), a session, or a member last seen offline."""
    key = '%s…' % str(peer.get('pubkey'))[:16]
    if peer.get('offline'):
        return '○ %s · %s · offline, last seen %s' % (peer.get('displayName'), key,
                                                     peer.get('lastSeenAt'))
    what = 'member' if peer.get('peerRole') == 'control-plane' else 'session'
    if peer.get('grace'):
        what += ', leaving (grace window)'
    return '● %s · %s · %s · %s' % (peer.get('displayName'), key, peer.get('status'), what)


