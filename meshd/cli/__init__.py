"""meshd's command line (argh): the parser, and the one place errors become exit codes.

Commands live beside this file, grouped by what they act on (daemon_commands, messages,
meshes; the broker's in meshd/broker/cli.py). They parse, call, print, and raise: any
MeshdError (or StorageError) that ends a command reaches `main`, which prints its text on
stderr and exits with its `exit_code` — 2 for usage, 1 for run time — never a traceback.
"""
from gevent import monkey; monkey.patch_all()  # noqa: E702 - before every other import

import os
import sys

import argh

from meshd import __version__, log as meshd_log
from meshd.argh_compat import add_group
from meshd.exceptions import MeshdError, StorageError

__all__ = ['build_parser', 'main']


def build_parser():
    from meshd.broker import cli as broker_cli
    from meshd.cli import claude_commands, daemon_commands, meshes, messages, service_commands
    parser = argh.ArghParser(prog='meshd', description='meshd: messages between agent '
                             'sessions across machines, through a claudemesh-protocol broker.')
    parser.add_argument('--version', action='version', version='meshd %s' % __version__)
    parser.add_commands([daemon_commands.quickstart, messages.send, messages.peers,
                         messages.inbox, messages.outbox, messages.sessions, messages.call,
                         meshes.join, meshes.leave, meshes.import_claudemesh, meshes.launch,
                         broker_cli.broker] + claude_commands.COMMANDS)
    add_group(parser, 'daemon', daemon_commands.COMMANDS + [service_commands.install_service],
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
    except (MeshdError, StorageError) as exc:
        sys.stdout.flush()
        text = str(exc)
        if text:
            print(text, file=sys.stderr, flush=True)
        sys.exit(getattr(exc, 'exit_code', 1))
