"""What a mesh shares, and how you show on it: `state`, `remember`/`recall`/`forget`,
`profile`, `group` (docs/local-api.md, "Shared data, presence, moderation, grants and
message status"); `skill` is in skill_commands.

Each verb is one daemon method; `daemon_call` is how all of them (and those of
skill_commands and moderation_commands) call it and turn an error answer into one line and
an exit code, and `common_options` gives each its --json and --no-spawn.
"""
import json as jsonlib
import shutil
import sys

import argh

from rpc.client import RpcCallError, RpcConnectionError

from meshd.argh_compat import arg
from meshd.cli import daemon_client
from meshd.cli.output import invoked_as, print_json
from meshd.exceptions import RUNTIME, USAGE, CommandFailed, UsageError
from meshd.paths import Paths

# A broker verb may take link_rpc_timeout (5 s) per mesh, reads of every mesh run at once.
CALL_TIMEOUT = 15.0
USAGE_CODES = ('invalid_params', 'mesh_not_attached')
METHOD_NOT_FOUND = -32601


# -- calling the daemon ------------------------------------------------------------------

def daemon_call(verb, method, params, no_spawn):
    """`method`'s result, called as the caller's session; a daemon error ends the command
    with `failure(verb, …)`."""
    paths = Paths()
    client = daemon_client.connect(paths, CALL_TIMEOUT, spawn=not no_spawn)
    try:
        daemon_client.attach(client)
        return client.call(method, params)
    except RpcCallError as exc:
        raise failure(verb, method, exc) from None
    except RpcConnectionError as exc:
        raise daemon_client.unreachable(exc, paths) from None
    finally:
        client.close()


def failure(verb, method, exc):
    """The one line of a daemon error answer to `meshd VERB`, with what the user can do, and
    its exit code: 2 for what the command line asked wrong, else 1."""
    data, slug = exc.data, exc.slug
    message = exc.error.get('message') or slug or 'error'
    hint = ''
    if exc.code == METHOD_NOT_FOUND:
        hint = ' — the running daemon has no %s: restart it (`%s daemon down`, then retry)' % (
            method, invoked_as())
    elif slug == 'mesh_required':
        joined = data.get('attached') or data.get('meshes') or []
        hint = '; joined meshes: %s — pick one with --mesh' % ', '.join(joined)
    elif slug == 'ambiguous' and data.get('candidates'):
        hint = '; candidates: ' + ', '.join(
            '%s %s…' % (c.get('display_name') or c.get('name'), (c.get('pubkey') or '')[:12])
            for c in data['candidates'])
    elif slug == 'peer_not_found':
        hint = '; see `%s peers --all`' % invoked_as()
    elif slug == 'broker_unreachable':
        hint = '%s; see `%s daemon status`' % (
            ' (%s)' % data['detail'] if data.get('detail') and data['detail'] not in message
            else '', invoked_as())
    elif slug == 'broker_timeout':
        hint = '; the broker did not answer in time, try again'
    elif data.get('unreachable'):
        hint = ' (no answer from mesh %s)' % ', '.join(data['unreachable'])
    return CommandFailed('%s failed: %s%s' % (verb, message, hint),
                         USAGE if slug in USAGE_CODES else RUNTIME)


def with_mesh(params, mesh):
    if mesh:
        params['mesh'] = mesh
    return params


def split_list(values):
    """`--tag a,b --tag c` as ['a', 'b', 'c']: trimmed, no blanks, each once."""
    items = []
    for value in values or ():
        for item in value.split(','):
            item = item.strip()
            if item and item not in items:
                items.append(item)
    return items


def when(iso):
    """An ISO time of the broker as `YYYY-MM-DD HH:MM:SS` (UTC), `-` when it has none."""
    return iso[:19].replace('T', ' ') if iso else '-'


def print_table(header, rows, wide=None):
    """Columns as wide as their widest cell; column `wide` takes what the terminal leaves
    and truncates its cells with …"""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    if wide is not None:
        others = sum(w for i, w in enumerate(widths) if i != wide) + 2 * (len(header) - 1)
        room = max(12, shutil.get_terminal_size((100, 24)).columns - others)
        widths[wide] = min(widths[wide], room)
    for row in [header] + rows:
        cells = [_fit(str(cell), widths[i]) for i, cell in enumerate(row)]
        print('  '.join(cell.ljust(widths[i]) for i, cell in enumerate(cells)).rstrip())


def _fit(text, width):
    return text if len(text) <= width else text[:width - 1] + '…'


def print_unreachable(result):
    for slug in result.get('unreachable') or []:
        print('mesh %s: broker unreachable' % slug)


def _meshes(result):
    return ', '.join(result.get('meshes') or []) or '(no mesh)'


def common_options(function):
    """--json and --no-spawn, which every verb of these modules has."""
    function = arg('--json', default=False, action='store_true',
                   help="print the daemon's result as JSON")(function)
    return arg('--no-spawn', default=False, action='store_true',
               help='do not start the daemon when it is not running')(function)


def mesh_option(help_text):
    return arg('--mesh', default=None, help=help_text)


ONE_MESH = "the mesh; without it, the session's, else the only one joined"
ALL_MESHES = "only this mesh; without it, the session's, else every joined mesh"


# -- shared state --------------------------------------------------------------------------

@argh.named('get')
@arg('key', help='the key')
@mesh_option(ALL_MESHES)
@common_options
def state_get(key, *, mesh=None, json=False, no_spawn=False):
    """Print a shared key's value as JSON (--json: the whole entry)."""
    result = daemon_call('state get', 'state.get', with_mesh({'key': key}, mesh), no_spawn)
    print_json(result if json else result['state'].get('value'))


@argh.named('set')
@arg('key', help='the key')
@arg('value', help='the value: JSON when it parses as JSON (42, true, {"a": 1}), else text')
@arg('--string', default=False, action='store_true', help='take VALUE as text, even 42')
@mesh_option(ONE_MESH)
@common_options
def state_set(key, value, *, string=False, mesh=None, json=False, no_spawn=False):
    """Set a shared key of the mesh; every member sees it."""
    if not key:
        raise UsageError('state set: the key is empty')
    parsed = value
    if not string:
        try:
            parsed = jsonlib.loads(value)
        except ValueError:
            parsed = value
    result = daemon_call('state set', 'state.set',
                         with_mesh({'key': key, 'value': parsed}, mesh), no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ %s = %s on %s' % (key, jsonlib.dumps(parsed, ensure_ascii=False),
                                   result.get('mesh')))


@argh.named('list')
@mesh_option(ALL_MESHES)
@common_options
def state_list(*, mesh=None, json=False, no_spawn=False):
    """List the shared keys: key, value, who set it and when (UTC), mesh."""
    result = daemon_call('state list', 'state.list', with_mesh({}, mesh), no_spawn)
    if json:
        print_json(result)
        return
    entries = result.get('entries') or []
    if entries:
        print_table(('KEY', 'VALUE', 'UPDATED BY', 'UPDATED AT', 'MESH'),
                    [(e.get('key'), jsonlib.dumps(e.get('value'), ensure_ascii=False),
                      e.get('updatedBy') or '-', when(e.get('updatedAt')), e.get('mesh'))
                     for e in entries], wide=1)
    else:
        print('(no shared state)')
    print_unreachable(result)


STATE_COMMANDS = [state_get, state_set, state_list]


# -- memories ------------------------------------------------------------------------------

@arg('text', nargs='+', help='what to remember; - reads it from stdin')
@arg('--tag', default=None, action='append', help='a tag (repeat it, or a,b,c)')
@mesh_option(ONE_MESH)
@common_options
def remember(*text, tag=None, mesh=None, json=False, no_spawn=False):
    """Remember a text on the mesh for every member to recall; prints its id."""
    content = ' '.join(text)
    if content == '-':
        content = sys.stdin.read()
    if not content.strip():
        raise UsageError('remember: the text is empty')
    params = {'content': content}
    tags = split_list(tag)
    if tags:
        params['tags'] = tags
    result = daemon_call('remember', 'memory.remember', with_mesh(params, mesh), no_spawn)
    if json:
        print_json(result)
    else:
        print(result['id'])


@arg('query', nargs='+', help='words the memory must all contain (in its text or tags)')
@mesh_option(ALL_MESHES)
@common_options
def recall(*query, mesh=None, json=False, no_spawn=False):
    """Find memories of the mesh: id, who, when (UTC), first line."""
    words = ' '.join(query)
    if not words.strip():
        raise UsageError('recall: the query is empty')
    result = daemon_call('recall', 'memory.recall', with_mesh({'query': words}, mesh),
                         no_spawn)
    if json:
        print_json(result)
        return
    matches = result.get('matches') or []
    if not matches:
        print('(no memory matches "%s")' % words)
    for match in matches:
        lines = (match.get('content') or '').strip().splitlines() or ['']
        more = ' …' if len(lines) > 1 else ''
        # The whole id: `forget` takes nothing shorter.
        print('%s  %s  %s  %s%s' % (match.get('id'), match.get('rememberedBy') or '-',
                                    when(match.get('rememberedAt')), lines[0], more))
    print_unreachable(result)


@arg('memory_id', metavar='ID', help='the id `remember` printed (as `recall` shows it)')
@mesh_option(ONE_MESH)
@common_options
def forget(memory_id, *, mesh=None, json=False, no_spawn=False):
    """Forget a memory of the mesh."""
    if not memory_id.strip():
        raise UsageError('forget: the id is empty')
    result = daemon_call('forget', 'memory.forget', with_mesh({'id': memory_id}, mesh),
                         no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ forgot %s on %s' % (memory_id, result.get('mesh')))


MEMORY_COMMANDS = [remember, recall, forget]


# -- profile and groups --------------------------------------------------------------------

@arg('--summary', default=None, help='what you are doing, one line')
@arg('--status', default=None, choices=('idle', 'working', 'dnd'), help='idle, working or dnd')
@arg('--visible', default=None, choices=('yes', 'no'), help='shown in peer lists: yes or no')
@arg('--title', default=None, help='your title')
@arg('--bio', default=None, help='a few words about you')
@arg('--avatar', default=None, help='an avatar (emoji or URL)')
@arg('--capability', default=None, action='append',
     help='something you can do (repeat it, or a,b,c)')
@mesh_option(ALL_MESHES)
@common_options
def profile(*, summary=None, status=None, visible=None, title=None, bio=None, avatar=None,
            capability=None, mesh=None, json=False, no_spawn=False):
    """Set how you show to peers; only the options given change."""
    params = {name: value for name, value in (
        ('summary', summary), ('status', status), ('title', title), ('bio', bio),
        ('avatar', avatar)) if value is not None}
    if visible is not None:
        params['visible'] = visible == 'yes'
    if capability is not None:
        params['capabilities'] = split_list(capability)
    if not params:
        raise UsageError('profile: give at least one of --summary, --status, --visible, '
                         '--title, --bio, --avatar, --capability')
    result = daemon_call('profile', 'profile.set', with_mesh(params, mesh), no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ profile %s set on %s' % (', '.join(result.get('applied') or sorted(params)),
                                          _meshes(result)))


@argh.named('join')
@arg('name', help='the group, @name')
@arg('--role', default=None, help='your role in the group')
@mesh_option(ALL_MESHES)
@common_options
def group_join(name, *, role=None, mesh=None, json=False, no_spawn=False):
    """Join a group: messages to @name reach you."""
    if not name.lstrip('@').strip():
        raise UsageError('group join: the group name is empty')
    params = with_mesh({'name': name}, mesh)
    if role:
        params['role'] = role
    result = daemon_call('group join', 'groups.join', params, no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ joined %s%s on %s' % (_at(result.get('group') or name),
                                       ' as %s' % role if role else '', _meshes(result)))


@argh.named('leave')
@arg('name', help='the group, @name')
@mesh_option(ALL_MESHES)
@common_options
def group_leave(name, *, mesh=None, json=False, no_spawn=False):
    """Leave a group."""
    if not name.lstrip('@').strip():
        raise UsageError('group leave: the group name is empty')
    result = daemon_call('group leave', 'groups.leave', with_mesh({'name': name}, mesh),
                         no_spawn)
    if json:
        print_json(result)
    else:
        print('✔ left %s on %s' % (_at(result.get('group') or name), _meshes(result)))


def _at(name):
    return name if name.startswith('@') else '@' + name


GROUP_COMMANDS = [group_join, group_leave]
PRESENCE_COMMANDS = [profile]
