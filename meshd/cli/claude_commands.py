"""`meshd mcp`, `meshd hook`, `meshd install-claude` and `meshd uninstall-claude`: the last
hop into Claude Code (meshd/claude/)."""
import os
import sys

from meshd.argh_compat import arg

from meshd.cli.output import print_json
from meshd.paths import Paths

MANIFEST = 'claude-install.json'


@arg('--mesh', default=None,
          help='the mesh of the session this server registers (default: $MESHD_MESH, or the '
               'only joined mesh)')
def mcp(*, mesh=None):
    """Serve MCP on stdin/stdout for Claude Code: channel notifications and tools."""
    from meshd.claude import mcp as mcp_server
    sys.exit(mcp_server.run(mesh=mesh))


@arg('event', help='SessionStart, UserPromptSubmit, PostToolUse or Stop')
def hook(event):
    """Run by Claude Code at a hook event: hand this session's messages to the agent."""
    from meshd.claude import hook as hook_mod
    sys.exit(hook_mod.main([event]))


def _manifest(paths):
    return os.path.join(paths.home, MANIFEST)


def _print_report(report, as_json):
    if as_json:
        print_json(report)
        return
    for row in report['files']:
        if row.get('diff'):
            sys.stdout.write(row['diff'])
        line = '%-9s %s' % (row['action'], row['path'])
        if row.get('backup'):
            line += '  (backup: %s)' % row['backup']
        print(line)
    for note in report.get('notes', []):
        print('note: %s' % note)
    if report.get('dry_run'):
        print('(dry run: nothing was written)')


@arg('--project', default=None,
          help='write the project-scoped files of this directory (.mcp.json, .claude/)')
@arg('--dry-run', default=False, action='store_true', help='print the changes only')
@arg('--json', default=False, action='store_true', help='machine-readable output')
def install_claude(*, project=None, dry_run=False, json=False):
    """Make Claude Code run meshd's MCP server and hooks, and give it the meshd skill."""
    from meshd import control
    from meshd.claude import install
    paths = Paths()
    report = install.install(os.path.expanduser('~'), control.entry_command(), _manifest(paths),
                             project=project, meshd_home=os.environ.get('MESHD_HOME'),
                             dry_run=dry_run)
    _print_report(report, json)
    if not json and not dry_run:
        print('done: new Claude Code sessions hear mesh messages (restart running ones).')


@arg('--project', default=None, help='the project directory install-claude wrote to')
@arg('--dry-run', default=False, action='store_true', help='print the changes only')
@arg('--json', default=False, action='store_true', help='machine-readable output')
def uninstall_claude(*, project=None, dry_run=False, json=False):
    """Remove exactly what install-claude added to Claude Code's configuration."""
    from meshd.claude import install
    report = install.uninstall(os.path.expanduser('~'), _manifest(Paths()), project=project,
                               dry_run=dry_run)
    _print_report(report, json)


COMMANDS = [mcp, hook, install_claude, uninstall_claude]
