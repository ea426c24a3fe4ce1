"""meshd's command line (argh): the parser, and the one place errors become exit codes.

Commands live beside this file, grouped by what they act on (daemon_commands, messages,
meshes, shared_commands, skill_commands, moderation_commands; the broker's in
meshd/broker/cli.py). They parse, call, print, and raise: any
MeshdError (or StorageError) that ends a command reaches `main`, which prints its text on
stderr and exits with its `exit_code` — 2 for usage, 1 for run time — never a traceback.

The first line patches gevent, unless meshd/entry.py knows the command runs no greenlets
(`meshd send`: it only talks to the daemon). This package and the command modules import
neither gevent nor peewee nor psutil when they load, only inside the commands that need
them, so that such a command starts in a fraction of the time the daemon takes.
"""
import sys

from meshd.entry import patch_gevent; patch_gevent(sys.argv[1:])  # noqa: E702 - before the rest

import os
import signal

import argh

from meshd import __version__
from meshd.argh_compat import HELP_FORMAT, add_commands, add_group, command_name
from meshd.exceptions import USAGE, MeshdError, StorageError

__all__ = ['build_parser', 'main']

BROKER_COMMANDS = ('broker', 'broker-admin')


class Parser(argh.ArghParser):
    """argparse's parser, but a usage error is one line (and exit 2), like every error."""

    def error(self, message):
        self.exit(USAGE, '%s: error: %s (see %s --help)\n' % (self.prog, message, self.prog))


def build_parser(only=None):
    """meshd's parser: every command, or with `only` (the first word of a command line) that
    command or group alone when it is one. A command line parses, prints its help and fails
    the same with either; only `meshd --help` and the error for an unknown command list them
    all, and `only` then names none. Fifty subparsers are most of a short command's time,
    and meshd/broker/cli.py, which imports gevent and peewee, is imported only for its own
    commands and the full list."""
    from meshd.cli import (claude_commands, daemon_commands, meshes, messages,
                           moderation_commands, service_commands, shared_commands, shell,
                           skill_commands)
    broker, broker_admin = [], []
    if only is None or only in BROKER_COMMANDS:
        from meshd.broker import cli as broker_cli
        broker, broker_admin = [broker_cli.broker], broker_cli.ADMIN_COMMANDS
    commands = ([daemon_commands.quickstart, messages.send, messages.peers, messages.inbox,
                 messages.outbox, messages.sessions, messages.call, meshes.whoami, meshes.join,
                 meshes.leave, meshes.import_claudemesh, meshes.launch]
                + shared_commands.MEMORY_COMMANDS + shared_commands.PRESENCE_COMMANDS
                + moderation_commands.MODERATION_COMMANDS + [moderation_commands.msg_status]
                + broker + claude_commands.COMMANDS + shell.COMMANDS)
    groups = [('daemon', daemon_commands.COMMANDS + [service_commands.install_service],
               'run and control the daemon'),
              ('state', shared_commands.STATE_COMMANDS, "a mesh's shared keys and values"),
              ('skill', skill_commands.SKILL_COMMANDS, "a mesh's shared skills"),
              ('group', shared_commands.GROUP_COMMANDS, 'join or leave an @group'),
              ('grants', moderation_commands.GRANTS_COMMANDS, 'what each peer may send you')]
    if broker_admin:
        groups.append(('broker-admin', broker_admin, "administer a meshd broker's database"))
    if only is not None:
        commands = [function for function in commands if command_name(function) == only]
        groups = [group for group in groups if group[0] == only]
        if not commands and not groups:
            return build_parser()
    parser = Parser(prog='meshd', description='meshd: messages between agent sessions across '
                    'machines, through a claudemesh-protocol broker.', **HELP_FORMAT)
    parser.add_argument('--version', action='version', version='meshd %s' % __version__)
    add_commands(parser, commands)
    for name, functions, help_text in groups:
        add_group(parser, name, functions, help_text)
    return parser


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ['broker']:
        from meshd import log as meshd_log
        meshd_log.setup(debug=bool(os.environ.get('MESHD_DEBUG')))
    parser = build_parser(only=args[0] if args else None)
    try:
        parser.dispatch(argv=argv)
        sys.stdout.flush()
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        _reader_went_away()
    except (MeshdError, StorageError) as exc:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _reader_went_away()
        text = str(exc)
        if text:
            print(text, file=sys.stderr, flush=True)
        sys.exit(getattr(exc, 'exit_code', 1))


def _reader_went_away():
    """stdout was closed (`meshd inbox --json | head -1`): end quietly, as Unix tools do
    when SIGPIPE ends them, and keep Python from failing again on its final flush."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os._exit(128 + signal.SIGPIPE)
