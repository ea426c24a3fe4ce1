"""Fixtures for the last hop: a scripted MCP client on pipes and a hook runner.

McpClient runs `meshd mcp` as Claude Code does (a child process, JSON-RPC lines on its
stdin/stdout) and checks every line it reads: stdout must carry protocol lines only. Hooks
run as `meshd hook EVENT` processes with the hook's JSON on stdin.
"""
import json
import os
import subprocess
import sys
import time

import gevent
import gevent.event

from tests.base import DEADLINE, ENTRY, TEST_TIMINGS, wait_for
from tests.links_base import DAEMON_TIMINGS

# A hook's one-second deadline is its own test; elsewhere a loaded machine gets ten.
MCP_TIMINGS = {'mcp_register_delay': 0.5, 'mcp_reconnect_delay': 0.2,
               'events_keepalive': TEST_TIMINGS['events_keepalive'], 'hook_deadline': 10.0}


def agent_env(home, **extra):
    """The environment of a process Claude Code starts for this meshd home."""
    env = dict(os.environ, MESHD_HOME=home, MESHD_NO_AUTOSPAWN='1',
               MESHD_TEST_TIMINGS=json.dumps(dict(DAEMON_TIMINGS, **MCP_TIMINGS)))
    env.pop('MESHD_SESSION_TOKEN_FILE', None)
    env.update({key: value for key, value in extra.items() if value is not None})
    return env


class McpClient:
    """`meshd mcp` on pipes. `protocol_errors` collects any stdout line that is not a
    JSON-RPC 2.0 message; the test's cleanup fails on it."""

    def __init__(self, test, env, args=()):
        self.proc = subprocess.Popen([sys.executable, ENTRY, 'mcp'] + list(args),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.responses = {}
        self.notifications = []
        self.protocol_errors = []
        self.arrived = gevent.event.Event()
        self._ids = iter(range(1, 10 ** 9))
        self._reader = gevent.spawn(self._read)
        test.addCleanup(self.close)
        test.addCleanup(lambda: test.assertEqual(self.protocol_errors, [],
                                                 'stdout carried non-protocol lines'))

    def _read(self):
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                self.protocol_errors.append(line)
                continue
            if not isinstance(message, dict) or message.get('jsonrpc') != '2.0':
                self.protocol_errors.append(line)
                continue
            if 'id' in message and 'method' not in message:
                self.responses[message['id']] = message
            else:
                self.notifications.append(message)
            self.arrived.set()

    def write(self, message):
        self.proc.stdin.write((json.dumps(message) + '\n').encode('utf-8'))
        self.proc.stdin.flush()

    def request(self, method, params=None, timeout=DEADLINE):
        """The whole response message of one request."""
        request_id = next(self._ids)
        message = {'jsonrpc': '2.0', 'id': request_id, 'method': method}
        if params is not None:
            message['params'] = params
        self.write(message)
        return wait_for(lambda: self.responses.pop(request_id, None), timeout=timeout,
                        what='the answer to %s' % method)

    def call(self, method, params=None):
        answer = self.request(method, params)
        if 'error' in answer:
            raise AssertionError('%s failed: %s' % (method, answer['error']))
        return answer['result']

    def notify(self, method, params=None):
        message = {'jsonrpc': '2.0', 'method': method}
        if params is not None:
            message['params'] = params
        self.write(message)

    def handshake(self, version='2025-11-25'):
        """What Claude Code does: server/discover (refused), initialize, initialized."""
        discover = self.request('server/discover')
        result = self.call('initialize', {'protocolVersion': version, 'capabilities': {},
                                          'clientInfo': {'name': 'tests', 'version': '0'}})
        self.notify('notifications/initialized')
        return discover, result

    def channel(self, kind=None):
        """The channel notifications so far (of one meta kind)."""
        return [n['params'] for n in self.notifications
                if n.get('method') == 'notifications/claude/channel'
                and (kind is None or n['params']['meta'].get('kind') == kind)]

    def wait_channel(self, count, kind=None, timeout=DEADLINE):
        return wait_for(lambda: (lambda found: found if len(found) >= count else None)(
            self.channel(kind)), timeout=timeout, what='%d channel notifications' % count)

    def tool(self, name, arguments=None):
        return self.call('tools/call', {'name': name, 'arguments': arguments or {}})

    def close(self, timeout=DEADLINE):
        """Close stdin (the client went away) and wait for the server to exit."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=timeout)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream and not stream.closed:
                stream.close()
        return code


def run_hook(event, env, hook_input=None, timeout=DEADLINE):
    """(stdout, stderr, exit status, seconds) of one `meshd hook EVENT` run."""
    doc = {'session_id': 'claude-session', 'transcript_path': '/dev/null', 'cwd': os.getcwd(),
           'hook_event_name': event}
    doc.update(hook_input or {})
    started = time.monotonic()
    result = subprocess.run([sys.executable, ENTRY, 'hook', event], input=json.dumps(doc),
                            capture_output=True, text=True, env=env, timeout=timeout)
    return result.stdout, result.stderr, result.returncode, time.monotonic() - started


def hook_context(stdout):
    """The text a hook's JSON output hands to the model ('' for no output)."""
    if not stdout.strip():
        return ''
    doc = json.loads(stdout)
    if 'decision' in doc:
        return doc['reason']
    return doc['hookSpecificOutput']['additionalContext']


def token_file(test, directory, token):
    """A 0600 session-token file, as `meshd launch` writes it."""
    path = os.path.join(directory, 'session-token')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, 'w') as handle:
        handle.write(token)
    return path
