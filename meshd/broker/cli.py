"""argh commands of `meshd broker` and `meshd broker-admin` (DESIGN.md 21, spec/wire.md §11.6–§11.7).

Plain functions with keyword-only options, every option declared with `@arg` (meshd/argh_compat.py), so they read
the same under argh 0.26 and 0.31; they parse, call, print, and nothing else.
`meshd/cli/__init__.py` registers `broker` as a command and ADMIN_COMMANDS as the `broker-admin`
group.
User errors raise CommandFailed with one line (`error: …`) that meshd/cli's main prints before
exiting non-zero, never a traceback. This module does not patch gevent: the entry point has done
it.
"""
import json
import os
import sys

import argh

from meshd.argh_compat import arg

from meshd.broker import admin as admin_ops
from meshd.broker import store as broker_store
from meshd.exceptions import CommandFailed, MeshdError, StorageError

ENV_DB = 'MESHD_BROKER_DB'
ENV_BROKER_URL = 'MESHD_BROKER_URL'


def _failed(message, status=1):
    return CommandFailed('error: %s' % message, status)


def _env_int(name, default):
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise _failed('%s must be an integer, not %r' % (name, value), 2)


def _default_listen():
    port = os.environ.get('BROKER_PORT')
    return '127.0.0.1:%s' % port if port else '127.0.0.1:7900'


@arg('--listen', help='HOST:PORT to bind (default 127.0.0.1:7900, or $BROKER_PORT)')
@arg('--db', help='database path, sqlite:///path or postgresql://… (default $MESHD_BROKER_DB '
                       'or ~/.meshd/broker/broker.db)')
@arg('--rate-limit', help='per-member send limit BURST:PER_MIN, or off (default 60:600)')
@arg('--dm-ttl', help='how long a DM waits for an offline recipient: <n>d, <n>h, <n>m or '
                           'seconds (default 7d)')
@arg('--max-message-bytes', help='soft frame limit answered with an error (default 65536)')
@arg('--max-frame-bytes', help='hard frame limit, closed with 1009 (default 1048576)')
@arg('--max-connections-per-mesh', help='presences per mesh (default 100)')
@arg('--max-connections', help='WebSocket connections in all (default 1024); /health is '
                                    'answered beyond it')
@arg('--per-address-limit', help='connections one address may hold before saying hello '
                                      '(default 16)')
@arg('--hello-timeout', help='seconds a WebSocket may take to say hello (default 10)')
@arg('--trusted-proxy', help='ADDR[,ADDR…] of reverse proxies whose X-Forwarded-For is '
                                  'believed (none by default)')
def broker(*, listen=None, db=None, rate_limit='60:600', dm_ttl='7d', max_message_bytes=None,
           max_frame_bytes=None, max_connections_per_mesh=None, max_connections=None,
           per_address_limit=None, hello_timeout=None, trusted_proxy=None):
    """Run the meshd broker in the foreground (SIGTERM closes every socket with 1001)."""
    from meshd.broker.server import BrokerServer
    try:
        timings = {'broker_hello_timeout': float(hello_timeout)} if hello_timeout else None
        server = BrokerServer(
            listen=listen or _default_listen(), db=db or os.environ.get(ENV_DB) or None,
            rate_limit=rate_limit, dm_ttl=dm_ttl,
            max_message_bytes=int(max_message_bytes) if max_message_bytes
            else _env_int('MAX_MESSAGE_BYTES', 65536),
            max_frame_bytes=int(max_frame_bytes) if max_frame_bytes else 1048576,
            max_connections_per_mesh=int(max_connections_per_mesh) if max_connections_per_mesh
            else _env_int('MAX_CONNECTIONS_PER_MESH', 100),
            max_connections=int(max_connections) if max_connections else 1024,
            per_address_limit=int(per_address_limit) if per_address_limit else 16,
            trusted_proxies=trusted_proxy, timings=timings)
        server.run()
    except CommandFailed:
        raise
    except (MeshdError, StorageError, ValueError) as exc:
        raise _failed(str(exc), 2)
    except RuntimeError as exc:     # not monkey-patched: an entry-point bug, still one line
        raise _failed(str(exc), 1)
    except OSError as exc:
        raise _failed('cannot listen on %s: %s'
                      % (listen or _default_listen(), exc.strerror or exc), 1)


def _admin(db, operation, *args, **kwargs):
    """Open the database as its owner, run one admin operation on it, close it."""
    url = db or os.environ.get(ENV_DB) or None
    try:
        admin_ops.check_owner(url)
        store = broker_store.open_store(url)
        try:
            with store.connection():
                return operation(store, *args, **kwargs)
        finally:
            store.close()
    except (MeshdError, StorageError) as exc:
        raise _failed(str(exc))


def _print(result):
    sys.stdout.write(json.dumps(result, separators=(',', ':'), ensure_ascii=False) + '\n')


@arg('--name', help='mesh name')
@arg('--slug', help='mesh slug (default: derived from the name)')
@arg('--admin-pubkey', help='Ed25519 pubkey (64 hex) of an admin member to create')
@arg('--admin-name', help='display name of that admin member (default <name>-owner)')
@arg('--db', help='broker database (default $MESHD_BROKER_DB)')
def create_mesh(*, name=None, slug=None, admin_pubkey=None, admin_name=None, db=None):
    """Create a mesh with a fresh owner keypair and root key."""
    _print(_admin(db, admin_ops.create_mesh, name, slug=slug, admin_pubkey=admin_pubkey,
                  admin_name=admin_name))


@arg('--mesh', help='mesh slug or id')
@arg('--pubkey', help='the member\'s Ed25519 pubkey (64 hex)')
@arg('--name', help='display name')
@arg('--role', help='member or admin (default member)')
@arg('--role-tag', help='role tag shown to peers')
@arg('--groups', help='default groups G[:ROLE],…')
@arg('--broker-url', help='broker URL to echo into the output')
@arg('--db', help='broker database (default $MESHD_BROKER_DB)')
def add_member(*, mesh=None, pubkey=None, name=None, role='member', role_tag=None, groups=None,
               broker_url=None, db=None):
    """Register an existing Ed25519 pubkey as a member of a mesh."""
    if not mesh or not pubkey:
        raise _failed('--mesh and --pubkey are required')
    _print(_admin(db, admin_ops.add_member, mesh, pubkey, name, role=role, role_tag=role_tag,
                  groups=groups, broker_url=broker_url))


@arg('--mesh', help='mesh slug or id')
@arg('--broker-url', help='ws:// or wss:// URL ending in /ws (default $MESHD_BROKER_URL)')
@arg('--role', help='member or admin (default member)')
@arg('--expires', help='lifetime: <n>d, <n>h, <n>m or seconds (default 7d)')
@arg('--max-uses', help='how many joins the link allows (default 1)')
@arg('--name', help='display name preset for the joiner')
@arg('--role-tag', help='role tag preset')
@arg('--groups', help='groups preset G[:ROLE],…')
@arg('--code', help='also mint an 8-character invite code', action='store_true', default=False)
@arg('--json', help='print a JSON object instead of the bare link', action='store_true',
          default=False)
@arg('--db', help='broker database (default $MESHD_BROKER_DB)')
def invite(*, mesh=None, broker_url=None, role='member', expires='7d', max_uses=1, name=None,
           role_tag=None, groups=None, code=False, json=False, db=None):
    """Mint a v1 ic://join/ invite link."""
    if not mesh:
        raise _failed('--mesh is required')
    try:
        seconds = admin_ops.parse_expiry(expires)
        uses = int(max_uses)
    except (MeshdError, ValueError) as exc:
        raise _failed(str(exc) if isinstance(exc, MeshdError)
                      else '--max-uses must be an integer')
    result = _admin(db, admin_ops.invite, mesh, broker_url or os.environ.get(ENV_BROKER_URL),
                    role=role, expires=seconds, max_uses=uses, name=name, role_tag=role_tag,
                    groups=groups, code=code)
    if json:
        _print(result)
    else:
        sys.stdout.write(result['link'] + '\n')


@argh.named('list')
@arg('--mesh', help='list the members of this mesh instead of the meshes')
@arg('--json', help='print the JSON object instead of a table', action='store_true',
     default=False)
@arg('--db', help='broker database (default $MESHD_BROKER_DB)')
def list_meshes(*, mesh=None, json=False, db=None):
    """List meshes, or the members of one mesh."""
    result = _admin(db, admin_ops.list_, mesh)
    if json:
        _print(result)
    elif 'meshes' in result:
        _table(['slug', 'name', 'members', 'owner key'],
               [[m['slug'], m['name'], m['members'], m['owner_pubkey'][:16] + '…']
                for m in result['meshes']])
    else:
        _table(['name', 'role', 'key', 'state'],
               [[m['display_name'], m['role'], m['pubkey'], 'revoked' if m['revoked']
                 else 'active'] for m in result['members']])


def _table(headers, rows):
    """Columns padded to their widest cell, a header line first."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for row in [headers] + rows:
        sys.stdout.write('  '.join(str(cell).ljust(width)
                                   for cell, width in zip(row, widths)).rstrip() + '\n')


@arg('--mesh', help='mesh slug or id')
@arg('--member', help='member pubkey or id')
@arg('--db', help='broker database (default $MESHD_BROKER_DB)')
def revoke_member(*, mesh=None, member=None, db=None):
    """Revoke a member (a running broker closes its sockets with 4002 within one sweep)."""
    if not mesh or not member:
        raise _failed('--mesh and --member are required')
    _print(_admin(db, admin_ops.revoke_member, mesh, member))


@arg('--mesh', help='mesh slug or id')
@arg('--member', help='the recipient member (pubkey or id) whose grants change')
@arg('--sender', help='the sender pubkey the grant is about')
@arg('--caps', help='dm,broadcast,… or none (block) or default (remove the entry)')
@arg('--db', help='broker database (default $MESHD_BROKER_DB)')
def grant(*, mesh=None, member=None, sender=None, caps=None, db=None):
    """Edit a member's per-sender grants."""
    if not mesh or not member or not sender or not caps:
        raise _failed('--mesh, --member, --sender and --caps are required')
    _print(_admin(db, admin_ops.grant, mesh, member, sender, caps))


ADMIN_COMMANDS = [create_mesh, add_member, invite, list_meshes, revoke_member, grant]
