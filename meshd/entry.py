"""Where every way of running meshd starts: meshd.py, `python3 -m meshd`, the console script,
the single file and the Debian package's /usr/bin/meshd.

`meshd hook EVENT` runs at every prompt and tool call of a Claude Code session and must be
done within about a second: it uses no greenlets, so it skips gevent and the command parser
and starts in a fraction of the time. Every other command goes through meshd.cli, whose
first line patches gevent before anything else is imported.
"""
import sys


def main():
    if sys.argv[1:2] == ['hook']:
        from meshd.claude import hook
        sys.exit(hook.main(sys.argv[2:]))
    from meshd import cli
    cli.main()
