"""meshd's command line (argh): the parser, and the one place errors become exit codes.

Commands live beside this file, grouped by what they act on (daemon_commands, messages,
meshes, shared_commands, skill_commands, moderation_commands; the broker's in
meshd/broker/cli.py). They parse, call, print, and raise: any
MeshdError (or StorageError) that ends a command reaches `main`, which prints its text on
stderr and exits with its `exit_code` — 2 for usage, 1 for run time — never a traceback.
"""
from gevent import monkey; monkey.patch_all()  # noqa: E702 - before every other import

import os
import signal
import sys

import argh

from meshd import __version__, log as meshd_log
from meshd.argh_compat import HELP_FORMAT, add_commands, add_group
from meshd.exceptions import USAGE, MeshdError, StorageError

__all__ = ['build_parser', 'main']


class Parser(argh.ArghParser):
    """argparse's parser, but a usage error is one line (and exit 2), like every error."""

    def error(self, message):
        self.exit(USAGE, '%s: error: %s (see %s --help)\n' % (self.prog, message, self.prog))


def build_parser():
    from meshd.broker import cli as broker_cli
    from meshd.cli import (claude_commands, daemon_commands, meshes, messages,
                           moderation_commands, service_commands, shared_commands, shell,
                           skill_commands)
    parser = Parser(prog='meshd', description='meshd: messages between agent sessions across '
                    'machines, through a claudemesh-protocol broker.', **HELP_FORMAT)
    parser.add_argument('--version', action='version', version='meshd %s' % __version__)
    add_commands(parser, [daemon_commands.quickstart, messages.send, messages.peers,
                          messages.inbox, messages.outbox, messages.sessions, messages.call,
                          meshes.whoami, meshes.join, meshes.leave, meshes.import_claudemesh,
                          meshes.launch]
                 + shared_commands.MEMORY_COMMANDS + shared_commands.PRESENCE_COMMANDS
                 + moderation_commands.MODERATION_COMMANDS + [moderation_commands.msg_status]
                 + [broker_cli.broker] + claude_commands.COMMANDS + shell.COMMANDS)
    add_group(parser, 'daemon', daemon_commands.COMMANDS + [service_commands.install_service],
              'run and control the daemon')
    add_group(parser, 'state', shared_commands.STATE_COMMANDS, "a mesh's shared keys and values")
    add_group(parser, 'skill', skill_commands.SKILL_COMMANDS, "a mesh's shared skills")
    add_group(parser, 'group', shared_commands.GROUP_COMMANDS, 'join or leave an @group')
    add_group(parser, 'grants', moderation_commands.GRANTS_COMMANDS,
              'what each peer may send you')
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
