"""`meshd hook EVENT`: hand the session's messages to Claude Code at its hook events.

Claude Code runs it with the hook's JSON on stdin and reads stdout (spec/agents.md §4):
SessionStart and UserPromptSubmit hand over the rows not yet surfaced, PostToolUse what
became due since the last hand-over (a busy agent hears it between tool calls), and Stop
continues the session only for an unsurfaced `now` row, never while `stop_hook_active`. A
UserPromptSubmit that is a channel turn confirms the rows its `<channel>` tags name. Exactly
the rows printed are marked surfaced (`hook`), after they were written.

A hook must never hurt Claude Code: everything it does has a hard deadline of about one
second (a daemon that is down, stopped or slow means exit 0 and no output), it never prints
a traceback, never starts a daemon, and writes diagnostics only with MESHD_HOOK_DEBUG=1. It
runs without gevent: plain blocking sockets, so it starts fast.
"""
import json
import os
import signal
import sys

from rpc.client import RpcCallError, RpcClient

from meshd import crypto, files, procs, timings as timings_mod
from meshd.claude import render
from meshd.paths import Paths

EVENTS = ('SessionStart', 'UserPromptSubmit', 'PostToolUse', 'Stop')
TIMINGS = {'hook_deadline': 1.0}
BUDGET = 8000           # characters of context one hand-over may add
STATUS_OF = {'UserPromptSubmit': 'working', 'Stop': 'idle'}


class _Late(Exception):
    """The deadline passed."""


def main(argv, stdin=None, stdout=None, environ=None):
    """Run the hook for argv[0]; always return 0."""
    environ = os.environ if environ is None else environ
    debug = environ.get('MESHD_HOOK_DEBUG') == '1'
    try:
        deadline = timings_mod.load(TIMINGS, environ)['hook_deadline']
    except Exception:
        deadline = TIMINGS['hook_deadline']
    previous = signal.signal(signal.SIGALRM, _raise_late)
    signal.setitimer(signal.ITIMER_REAL, deadline)
    try:
        event = argv[0] if argv else None
        if event not in EVENTS:
            _debug(debug, 'unknown hook event %r' % event)
            return 0
        out = stdout or sys.stdout

        def write(text):
            out.write(text)
            out.flush()
        _run(event, _read_input(stdin or sys.stdin), environ, debug, write)
    except _Late:
        _debug(debug, 'deadline of %.1fs passed' % deadline)
    except Exception as exc:   # never a traceback in Claude Code's session
        _debug(debug, 'hook failed: %r' % (exc,))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return 0


def _raise_late(_signum, _frame):
    raise _Late()


def _debug(enabled, message):
    if enabled:
        print('meshd hook: %s' % message, file=sys.stderr)


def _read_input(stream):
    try:
        data = json.loads(stream.read() or '{}')
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _run(event, hook_input, environ, debug, write):
    """Hand over what is due at `event` through `write(text)`, then mark it surfaced."""
    paths = Paths()
    if not os.path.exists(paths.socket):
        _debug(debug, 'no daemon socket at %s' % paths.socket)
        return
    with RpcClient(socket_path=paths.socket, timeout=5.0) as client:
        if not _attach(client, environ):
            _debug(debug, 'no session for this hook')
            return
        if event == 'UserPromptSubmit':
            confirmed = render.channel_ids(hook_input.get('prompt'))
            if confirmed:
                client.call('inbox.mark_surfaced', {'ids': confirmed, 'via': 'channel'})
        if event in STATUS_OF:
            client.call('agent.status', {'status': STATUS_OF[event]})
        if event == 'Stop' and hook_input.get('stop_hook_active'):
            return
        answer = client.call('agent.handover', {'event': event})
        items, shown = answer['items'], []
        used = 0
        for item in items:
            line = render.hook_lines(item)
            if shown and used + len(line) > BUDGET:
                break
            shown.append(item)
            used += len(line)
        if not shown:
            return
        write(_output(event, render.hook_text(shown, answer['total'] - len(shown), event)))
        # Written first, marked second: a deadline in between leaves the rows unmarked and
        # they are handed over again (twice is better than never).
        client.call('inbox.mark_surfaced', {'ids': [item['id'] for item in shown],
                                            'via': 'hook'})


def _output(event, text):
    """What reaches the model for `event` (spec/agents.md §4)."""
    if event == 'Stop':
        return json.dumps({'decision': 'block', 'reason': text}) + '\n'
    return json.dumps({'hookSpecificOutput': {'hookEventName': event,
                                              'additionalContext': text}}) + '\n'


def _attach(client, environ):
    """Act as the session of MESHD_SESSION_TOKEN_FILE, else of the Claude Code process above
    this hook (the parent of the MCP bridge that registered it)."""
    token_file = environ.get('MESHD_SESSION_TOKEN_FILE')
    if token_file:
        token = (files.read_text(token_file) or '').strip().lower()
        if crypto.is_hex64(token):
            try:
                client.call('session.attach', {'token': token})
                return True
            except RpcCallError:
                pass
    pids = procs.ancestors(os.getpid())
    if not pids:
        return False
    try:
        client.call('session.attach_by_pids', {'pids': pids})
        return True
    except RpcCallError:
        return False

