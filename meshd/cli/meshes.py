"""Commands that change which meshes this user is on, and `launch`, which runs an agent as a
session of one."""
import os
import sys

from meshd.argh_compat import arg

from meshd.cli import daemon_client
from meshd.cli.output import print_json
from meshd.exceptions import CommandFailed, MeshdError
from meshd.paths import Paths


def _failed(prefix, exc):
    """`exc` with `prefix` before its text, keeping its exit code."""
    return CommandFailed('%s%s' % (prefix, exc), exc.exit_code)


@arg('--json', default=False, action='store_true', help='machine-readable output')
@arg('--no-spawn', default=False, action='store_true',
     help='do not start the daemon when it is not running')
def whoami(*, json=False, no_spawn=False):
    """Who you are on each mesh (member key, name), and the sessions of this daemon."""
    paths = Paths()
    meshes = daemon_client.call(paths, 'meshes.list', spawn=not no_spawn)['meshes']
    sessions = daemon_client.call(paths, 'sessions.list', spawn=not no_spawn)['sessions']
    for mesh in meshes:
        mesh['shown_as'] = mesh.get('display_name') or _name_on_roster(paths, mesh)
    if json:
        print_json({'meshes': meshes, 'sessions': sessions})
        return
    if not meshes:
        print('no mesh joined: meshd join <invite-link>')
    for mesh in meshes:
        print('%s on mesh %s · member key %s · broker %s' % (
            mesh['shown_as'] or '(unnamed)', mesh['slug'], mesh['pubkey'], mesh['status']))
    for session in sessions:
        presence = session.get('presence') or {}
        print('  session %s · mesh %s · pid %s · key %s' % (
            session['display_name'], session['mesh'], session['pid'],
            presence.get('session_pubkey') or '(none)'))


def _name_on_roster(paths, mesh):
    """The name the broker shows for this member (its daemon's row), or None."""
    try:
        peers = daemon_client.call(paths, 'peers.list', {'mesh': mesh['slug']})['peers']
    except CommandFailed:
        return None
    return next((p.get('displayName') for p in peers if p.get('pubkey') == mesh['pubkey']), None)


@arg('link', help='the invite link (ic://join/…)')
@arg('--name', default=None, help='your display name on this mesh')
@arg('--json', default=False, action='store_true', help='machine-readable output')
def join(link, *, name=None, json=False):
    """Join a mesh with an invite link; a running daemon attaches it at once."""
    from meshd import membership
    try:
        entry, warnings, reloaded = membership.join(Paths(), link, name)
    except MeshdError as exc:
        raise _failed('✘ join failed: ', exc) from exc
    for warning in warnings:
        print(warning, file=sys.stderr)
    if json:
        print_json({'ok': True, 'mesh': entry, 'daemon_reloaded': reloaded is not None})
    else:
        print('✔ joined %s' % entry['slug'])


@arg('slug', help='the mesh to leave')
def leave(slug):
    """Leave a mesh (removes it from config.json; a running daemon detaches it)."""
    from meshd import membership
    membership.leave(Paths(), slug)
    print('✔ left %s' % slug)


@arg('path', nargs='?', default=None,
          help='claudemesh config.json (default ~/.claudemesh/config.json)')
def import_claudemesh(path):
    """Copy the meshes of a claudemesh config into meshd's config."""
    from meshd import membership
    source = path or os.path.join(os.path.expanduser('~'), '.claudemesh', 'config.json')
    slugs, _reloaded = membership.import_claudemesh(Paths(), source)
    print('✔ imported %s' % ', '.join(slugs))


@arg('command', nargs='*', help='the agent to run (default: claude), after --')
@arg('--name', default=None, help='display name of the session')
@arg('--mesh', default=None, help='the mesh to bind the session to')
@arg('--role', default=None, help='role shown to peers')
@arg('--groups', default=None, help='groups NAME[:ROLE],…')
@arg('--resume', default=None, help='the session UUID to resume (keeps its keypair)')
@arg('--no-spawn', default=False, action='store_true',
     help='do not start the daemon when it is not running')
@arg('--continue', dest='continue_', default=False, action='store_true',
          help='resume the newest meshd session of this directory')
@arg('--no-channels', default=False, action='store_true',
          help='do not let meshd start Claude Code turns with channel notifications')
def launch(*command, name=None, mesh=None, role=None, groups=None, resume=None,
           continue_=False, no_channels=False, no_spawn=False):
    """Run an agent (default: claude) as a registered session until it exits."""
    from meshd import launch as launch_mod
    paths = Paths()
    try:
        status_code = launch_mod.run(
            paths, list(command) or ['claude'], mesh=mesh, name=name, role=role, groups=groups,
            resume=resume, resume_latest=continue_, channels=not no_channels,
            out=lambda line: print(line, file=sys.stderr),
            ensure=lambda: daemon_client.connect(paths, spawn=not no_spawn).close())
    except CommandFailed:
        raise               # the daemon could not be reached: its own line says so
    except MeshdError as exc:
        raise _failed('✘ launch: ', exc) from exc
    sys.stdout.flush()
    sys.exit(status_code)
