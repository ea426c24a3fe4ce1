"""Who may reach you and who may stay: `grants`, `kick`, `disconnect`, `ban`, `unban`, `bans`;
and what became of a message you sent: `msg-status` (docs/local-api.md, "Shared data,
presence, moderation, grants and message status")."""
import argh

from meshd.argh_compat import arg
from meshd.cli.output import invoked_as, print_json
from meshd.cli.shared_commands import (ALL_MESHES, ONE_MESH, common_options, daemon_call,
                                       mesh_option, print_table, print_unreachable,
                                       split_list, when, with_mesh)
from meshd.exceptions import UsageError


def _who(result):
    """`name (key prefix…)` of a grants answer."""
    key = (result.get('peer') or '')[:12]
    name = result.get('name')
    if name and key:
        return '%s (%s…)' % (name, key)
    return name or (key + '…')


# -- grants --------------------------------------------------------------------------------

@argh.named('list')
@mesh_option(ONE_MESH)
@common_options
def grants_list(*, mesh=None, json=False, no_spawn=False):
    """List what you let each peer do (peers not listed have the defaults)."""
    result = daemon_call('grants list', 'grants.list', with_mesh({}, mesh), no_spawn)
    if json:
        print_json(result)
        return
    print('grants on %s — everyone else: %s' % (result.get('mesh'),
                                                ', '.join(result.get('defaults') or [])
                                                or 'nothing'))
    grants = result.get('grants') or []
    if not grants:
        print('(no grants: every peer has the defaults)')
        return
    print_table(('PEER', 'KEY', 'MAY'),
                [(g.get('name') or '-', (g.get('peer') or '')[:16] + '…',
                  'blocked' if g.get('blocked') or not g.get('capabilities')
                  else ', '.join(g['capabilities'])) for g in grants])


@argh.named('set')
@arg('peer', help='a name, key prefix or key')
@arg('capabilities', help='CAP[,CAP…] from read, dm, broadcast, state-read')
@mesh_option(ONE_MESH)
@common_options
def grants_set(peer, capabilities, *, mesh=None, json=False, no_spawn=False):
    """Let a peer do these things only (replaces what it had)."""
    caps = split_list([capabilities])
    if not caps:
        raise UsageError('grants set: no capability given (to refuse everything: `%s grants '
                         'block %s`)' % (invoked_as(), peer))
    result = daemon_call('grants set', 'grants.set',
                         with_mesh({'peer': peer, 'capabilities': caps}, mesh), no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ %s may now: %s (on %s)' % (_who(result),
                                            ', '.join(result.get('capabilities') or caps),
                                            result.get('mesh')))


@argh.named('block')
@arg('peer', help='a name, key prefix or key')
@mesh_option(ONE_MESH)
@common_options
def grants_block(peer, *, mesh=None, json=False, no_spawn=False):
    """Refuse everything from a peer: its messages to you fail at its end."""
    result = daemon_call('grants block', 'grants.block', with_mesh({'peer': peer}, mesh),
                         no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ blocked %s on %s' % (_who(result), result.get('mesh')))


@argh.named('revoke')
@arg('peer', help='a name, key prefix or key')
@mesh_option(ONE_MESH)
@common_options
def grants_revoke(peer, *, mesh=None, json=False, no_spawn=False):
    """Drop a peer's grant: it has the defaults again."""
    result = daemon_call('grants revoke', 'grants.revoke', with_mesh({'peer': peer}, mesh),
                         no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ %s has the defaults again: %s (on %s)' % (
            _who(result), ', '.join(result.get('capabilities') or []) or 'nothing',
            result.get('mesh')))


GRANTS_COMMANDS = [grants_list, grants_set, grants_block, grants_revoke]


# -- moderation ----------------------------------------------------------------------------

def _selector(verb, target, all_, stale):
    """The members.kick/disconnect parameters of exactly one of TARGET, --all, --stale."""
    chosen = [given for given in (target is not None, all_, stale is not None) if given]
    if len(chosen) != 1:
        raise UsageError('%s: give one of TARGET, --all or --stale SECONDS' % verb)
    if target is not None:
        if not target.strip():
            raise UsageError('%s: the target is empty' % verb)
        return {'target': target}
    if all_:
        return {'all': True}
    if stale <= 0:
        raise UsageError('%s: --stale takes a number of seconds above 0' % verb)
    return {'stale_ms': int(stale * 1000)}


def _moderate(verb, target, all_, stale, mesh, json, no_spawn):
    params = with_mesh(_selector(verb, target, all_, stale), mesh)
    result = daemon_call(verb, 'members.' + verb, params, no_spawn)
    if json:
        print_json(result)
        return
    done = {'kick': 'kicked', 'disconnect': 'disconnected'}[verb]
    affected = result.get('affected') or []
    print('%s on %s: %s' % (done, result.get('mesh'), ', '.join(affected) or 'nobody'))
    skipped = result.get('skipped_control_plane') or []
    if skipped:
        print('left connected (daemons; `%s disconnect` ends those): %s'
              % (invoked_as(), ', '.join(skipped)))


def _moderation_options(function):
    function = arg('target', nargs='?', default=None,
                   help='a display name, member key or key prefix')(function)
    function = arg('--all', default=False, action='store_true',
                   help='everyone but you')(function)
    function = arg('--stale', default=None, type=float,
                   help='those silent for more than SECONDS')(function)
    return mesh_option(ONE_MESH)(common_options(function))


@_moderation_options
def kick(target, *, all=False, stale=None, mesh=None, json=False,  # noqa: A002 - it is --all
         no_spawn=False):
    """Close sessions of the mesh (admins only); they may come back. Daemons stay."""
    _moderate('kick', target, all, stale, mesh, json, no_spawn)


@_moderation_options
def disconnect(target, *, all=False, stale=None, mesh=None, json=False,  # noqa: A002
               no_spawn=False):
    """Close connections of the mesh, daemons' too (admins only); they may reconnect."""
    _moderate('disconnect', target, all, stale, mesh, json, no_spawn)


@arg('target', help='a display name, member key or key prefix')
@mesh_option(ONE_MESH)
@common_options
def ban(target, *, mesh=None, json=False, no_spawn=False):
    """Revoke a member of the mesh and close its connections (admins only)."""
    result = daemon_call('ban', 'members.ban', with_mesh({'target': target}, mesh), no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ banned %s on %s' % (result.get('banned') or target, result.get('mesh')))


@arg('target', help='a display name or member key')
@mesh_option(ONE_MESH)
@common_options
def unban(target, *, mesh=None, json=False, no_spawn=False):
    """Let a banned member back into the mesh (admins only)."""
    result = daemon_call('unban', 'members.unban', with_mesh({'target': target}, mesh),
                         no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ unbanned %s on %s' % (result.get('unbanned') or target, result.get('mesh')))


@mesh_option(ALL_MESHES)
@common_options
def bans(*, mesh=None, json=False, no_spawn=False):
    """List the banned members: name, key, since when (UTC), mesh."""
    result = daemon_call('bans', 'members.bans', with_mesh({}, mesh), no_spawn)
    if json:
        print_json(result)
        return
    rows = result.get('bans') or []
    if rows:
        print_table(('NAME', 'KEY', 'BANNED AT', 'MESH'),
                    [(b.get('name') or '-', (b.get('pubkey') or '')[:16] + '…',
                      when(b.get('revokedAt')), b.get('mesh')) for b in rows])
    else:
        print('(no bans)')
    print_unreachable(result)


MODERATION_COMMANDS = [kick, disconnect, ban, unban, bans]


# -- message status ------------------------------------------------------------------------

@arg('client_message_id', metavar='CLIENT_MESSAGE_ID',
     help='the id `send --client-message-id` took, or `outbox` shows (cid=…)')
@common_options
def msg_status(client_message_id, *, json=False, no_spawn=False):
    """Say what became of a message you sent: pending, queued, delivered, failed."""
    result = daemon_call('msg-status', 'message.status',
                         {'client_message_id': client_message_id}, no_spawn)
    if json:
        print_json(result)
    else:
        print(status_line(result))


def status_line(result):
    """One line on a message.status result."""
    delivery = result.get('delivery')
    error = result.get('last_error')
    if delivery == 'delivered':
        at = result.get('delivered_at')
        return 'delivered (at %s)' % at if at else 'delivered (accepted by the broker)'
    if delivery == 'queued':
        expires = result.get('expires_at')
        return 'queued at the broker%s' % (' (expires %s)' % expires if expires else '')
    if delivery == 'pending':
        attempts = result.get('attempts')
        why = ['attempt %d' % attempts] if attempts else []
        if error:
            why.append(error)
        return 'pending in the outbox%s' % (' (%s)' % ': '.join(why) if why else '')
    if delivery == 'failed':
        return 'failed: %s' % (error or result.get('outbox_status') or 'no reason given')
    if delivery == 'undelivered':
        return 'undelivered: %s' % (error or 'the broker gave up (expired or recipient removed)')
    why = error or result.get('detail') or 'the broker accepted it but cannot say more'
    return '%s: %s' % (delivery or 'unknown', why)
