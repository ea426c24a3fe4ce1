"""Where every way of running meshd starts: meshd.py, `python3 -m meshd`, the console script,
the single file and the Debian package's /usr/bin/meshd. It decides, per command and before
anything else is imported, whether this process runs greenlets.

Commands that run greenlets (`daemon up --foreground`, `broker`, `mcp`, `launch`,
`quickstart`, and every command not listed below) patch gevent first (`patch_gevent`, the
first line of meshd.cli). Commands that only talk to a running daemon over its socket
(`send`, `inbox`, `peers`…) run no greenlets: they skip gevent, and meshd.cli builds the
parser of their command alone, without importing the broker's (gevent, peewee). When they
start a daemon (auto-start, `daemon up`), it is a separate process, which patches itself.

`meshd hook EVENT` runs at every prompt and tool call of a Claude Code session and must be
done within about a second: it skips the command parser too.

MESHD_DEBUG_MODULES=PATH (for tests/test_cli_startup.py): at exit, write the names of the
imported modules to PATH, one a line, to check which path a command took.
"""
import sys

# Top-level commands that only call the daemon (or read local files): no greenlets.
CLIENT_COMMANDS = frozenset([
    'send', 'inbox', 'outbox', 'peers', 'sessions', 'call', 'whoami',
    'remember', 'recall', 'forget', 'profile', 'state', 'skill', 'group', 'grants',
    'kick', 'disconnect', 'ban', 'unban', 'bans', 'msg-status'])
# `daemon` subcommands that control the daemon from outside: `up` starts it as another
# process and waits for its socket, unless --foreground runs it here.
CLIENT_DAEMON_COMMANDS = frozenset(['status', 'down', 'up'])


def runs_greenlets(args):
    """False when the command line `args` (argv without the program) only talks to a daemon;
    True for everything else, including what it cannot tell."""
    if args[:1] and args[0] in CLIENT_COMMANDS:
        return False
    if args[:1] == ['daemon'] and args[1:2] and args[1] in CLIENT_DAEMON_COMMANDS:
        return args[1] == 'up' and _may_ask_foreground(args[2:])
    return True


def _may_ask_foreground(words):
    """True when `daemon up WORDS` may mean --foreground: argparse takes any prefix of a long
    option (--fore) and bundled short flags (-jf), so every such word counts."""
    for word in words:
        if word == '--':
            return False
        if word.startswith('--'):
            if len(word) > 2 and '--foreground'.startswith(word.split('=', 1)[0]):
                return True
        elif word.startswith('-') and 'f' in word[1:]:
            return True
    return False


def patch_gevent(args):
    """Patch gevent unless the command line `args` runs no greenlets. meshd.cli calls it on
    its first line, so that every way into it (this main, a console script written when it
    was `meshd.cli:main`) decides before anything else is imported; patching twice is a no-op."""
    if runs_greenlets(args):
        from gevent import monkey
        monkey.patch_all()


def main():
    args = sys.argv[1:]
    if args[:1] == ['hook']:
        from meshd.claude import hook
        sys.exit(hook.main(args[1:]))
    _debug_modules()
    from meshd import cli    # patches gevent first, unless the command runs no greenlets
    cli.main()


def _debug_modules():
    import os
    path = os.environ.get('MESHD_DEBUG_MODULES')
    if path:
        import atexit
        atexit.register(_write_modules, path)


def _write_modules(path):
    with open(path, 'w') as handle:
        handle.write(''.join('%s\n' % name for name in sorted(sys.modules)))
