"""How CLI commands print: pretty JSON for --json, plain lines for people."""
import json
import os
import sys


def print_json(value):
    print(json.dumps(value, indent=2, ensure_ascii=False))


def report(as_json, value, text, code=None):
    """Print `value` as JSON or `text` for people; then exit with `code` when one is given
    (a result that is not an error, such as `daemon status` finding nothing running)."""
    if as_json:
        print_json(value)
    else:
        print(text)
    if code is not None:
        sys.stdout.flush()
        sys.exit(code)


def invoked_as():
    """How the user ran meshd, for hints: `meshd`, `python3 dist/meshd.py`, `python3 -m meshd`."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else 'meshd'
    name = os.path.basename(argv0)
    if name == 'meshd':
        return 'meshd'
    python = os.path.basename(sys.executable or 'python3')
    if name == '__main__.py':
        return '%s -m meshd' % python
    return '%s %s' % (python, argv0)


def seconds_text(seconds):
    """7 days, 2.5 hours, 90 seconds: a duration as people say it."""
    for size, name in ((86400, 'days'), (3600, 'hours'), (60, 'minutes')):
        if seconds >= size:
            return '%g %s' % (round(seconds / size, 1), name)
    return '%d seconds' % seconds
