"""Commands that change which meshes this user is on, and `launch`, which runs an agent as a
session of one."""
import os
import sys

import argh

from meshd.cli import daemon_client
from meshd.cli.output import print_json
from meshd.exceptions import CommandFailed, MeshdError
from meshd.paths import Paths


def _failed(prefix, exc):
    """`exc` with `prefix` before its text, keeping its exit code."""
    return CommandFailed('%s%s' % (prefix, exc), exc.exit_code)


@argh.arg('link', help='the invite link (ic://join/…)')
@argh.arg('--name', default=None, help='your display name on this mesh')
@argh.arg('--json', default=False, action='store_true', help='machine-readable output')
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


@argh.arg('slug', help='the mesh to leave')
def leave(slug):
    """Leave a mesh (removes it from config.json; a running daemon detaches it)."""
    from meshd import membership
    membership.leave(Paths(), slug)
    print('✔ left %s' % slug)


@argh.arg('path', nargs='?', default=None,
          help='claudemesh config.json (default ~/.claudemesh/config.json)')
def import_claudemesh(path):
    """Copy the meshes of a claudemesh config into meshd's config."""
    from meshd import membership
    source = path or os.path.join(os.path.expanduser('~'), '.claudemesh', 'config.json')
    slugs, _reloaded = membership.import_claudemesh(Paths(), source)
    print('✔ imported %s' % ', '.join(slugs))


@argh.arg('command', nargs='*', help='the agent to run (default: claude), after --')
@argh.arg('--name', default=None, help='display name of the session')
@argh.arg('--mesh', default=None, help='the mesh to bind the session to')
@argh.arg('--role', default=None, help='role shown to peers')
@argh.arg('--groups', default=None, help='groups NAME[:ROLE],…')
@argh.arg('--resume', default=None, help='the session UUID to resume (keeps its keypair)')
@argh.arg('--continue', dest='continue_', default=False, action='store_true',
          help='resume the newest meshd session of this directory')
@argh.arg('--no-channels', default=False, action='store_true',
          help='do not let meshd start Claude Code turns with channel notifications')
def launch(*command, name=None, mesh=None, role=None, groups=None, resume=None,
           continue_=False, no_channels=False):
    """Run an agent (default: claude) as a registered session until it exits."""
    from meshd import launch as launch_mod
    paths = Paths()
    try:
        status_code = launch_mod.run(
            paths, list(command) or ['claude'], mesh=mesh, name=name, role=role, groups=groups,
            resume=resume, resume_latest=continue_, channels=not no_channels,
            out=lambda line: print(line, file=sys.stderr),
            ensure=lambda: daemon_client.connect(paths).close())
    except CommandFailed:
        raise               # the daemon could not be reached: its own line says so
    except MeshdError as exc:
        raise _failed('✘ launch: ', exc) from exc
    sys.stdout.flush()
    sys.exit(status_code)
