"""Seeded fuzzing of the daemon's JSON-RPC line parser and of the broker's frame handler.

Inputs come from random.Random(SEED): DEFAULT_SEED, or MESHD_FUZZ_SEED (decimal or 0x-hex).
A failure prints the seed and, grouped by kind of problem, each distinct input that showed it
(cut to about 300 characters): replay the run with
`MESHD_FUZZ_SEED=<seed> python -m nose2 -v tests.fault.test_fuzz`, or send an input by hand.
"""
import collections
import json
import logging
import os
import random
import time
import unittest

import gevent
import gevent.event
import psutil
import websocket

from rpc.protocol import INTERNAL_ERROR, MAX_LINE

from meshd import crypto
from tests.base import DEADLINE, TIME_FACTOR, MeshdTestCase, Raw, make_mesh
from tests.broker.base import BrokerTestMixin, Closed, hello_frame, session_hello_frame

DEFAULT_SEED = 20260101
SEED = int(os.environ.get('MESHD_FUZZ_SEED') or str(DEFAULT_SEED), 0)
RPC_LINES, BROKER_FRAMES, HELLO_VARIANTS, PRE_HELLO_FRAMES = 20000, 20000, 2000, 1000
MIB = 1024 * 1024
MAX_DEPTH = 50
RPC_CONNECTIONS = 4
RPC_CHUNK = 25                  # lines between two daemon.version sync requests
SYNC_EVERY = 50                 # frames of one broker peer between two list_peers sync points
SLOW_SYNC = 5.0 * TIME_FACTOR   # a sync point normally takes a tenth of a second
HANG = 120.0 * TIME_FACTOR
SHOWN = 20                      # distinct inputs shown per kind of problem
TEXT, BINARY = websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY

SURROGATES = ('\ud800', '\udbff', '\udc00', '\udfff', '\udc00\ud800')
NAN_LIKE = ('NaN', 'nan', '-NaN', 'Infinity', '-Infinity', 'inf', '1e999', '-0', '0x1F', 'null',
            'undefined', 'true', 'None', '9' * 40, '1e-400', '+1', '.5')
ODD_STRINGS = ('', ' ', '\t', '\x00', 'a\x00b', '\x7f', '\u202e', '\u00fc', '\U0001f600',
               '\ufeff', '\uffff', '\u2028', '\U0010ffff', '../../../etc/passwd',
               "'; DROP TABLE outbox; --", '%s%n%x', '${jndi:x}', '__proto__', '<script>', '\\',
               '"', '\r\n', '*', '@', '#', '@all', '/', 'a/b/c', '2026-13-45T99:99:99Z',
               '9999-12-31T23:59:59Z', '0001-01-01T00:00:00+14:00', '+275760-09-13T00:00:00Z')
NUMBERS = (10 ** 30, -10 ** 30, 2 ** 63, 2 ** 63 - 1, -2 ** 63 - 1, 2 ** 64, 2 ** 53 + 1, 2 ** 31,
           -2 ** 31 - 1, 10 ** 100, -1, 0.5, -0.0, 1e308, -1e308, 5e-324, 1.5, 1e16, -1e-7,
           2.0 ** 70, 0, 1, 2, 7, 42, 255, 1000, 65535)
JSON_TYPES = {'string': str, 'integer': int, 'number': (int, float), 'boolean': bool,
              'object': dict, 'array': list}
EXTRA_FIELDS = ('extra', '', 'id', 'params', '__proto__', 'sender', 'token ', 'meshId', 'pubkey',
                '\ud800', 'p\udc00', 'x' * 300, 'x' * 5000)
WHITESPACE = b' \t\r\x0b\x0c'
# Raw JSON no serializer writes: X becomes a non-finite or huge number, a duplicate key's
# value, or a string that is not UTF-8.
RAW_VALUES = (b'NaN', b'Infinity', b'-Infinity', b'1e400', b'-1e400', b'9' * 5000, b'2.5', b'{}',
              b'null', b'"\xff"', b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"',
              b'"\x80"', b'"\xe2\x82"', b'"\xc3\x28"', b'"\xf8\x88\x80\x80\x80"')
RAW_LINES = (b'{"jsonrpc":"2.0","id":X,"method":"daemon.version"}',
             b'{"jsonrpc":"2.0","id":7,"method":"inbox.list","params":{"limit":X}}',
             b'{"jsonrpc":"2.0","id":1,"id":X,"method":"rpc.list"}',
             b'{"jsonrpc":"2.0","id":8,"method":"send","params":{"to":"*","message":X}}')
RAW_FRAMES = (b'{"type":"set_summary","summary":X}', b'{"type":"kick","_reqId":"r","stale":X}',
              b'{"type":"set_stats","stats":X}', b'{"type":"get_state","key":X}',
              b'{"type":"send","id":X,"targetSpec":"*"}')

# Plausible values of the daemon's parameters, by name (else by type).
PEER_KEY = 'ab' * 32
RPC_PARAMS = {
    'to': ('*', '@team', '@all', '@team/sub', 'bob', PEER_KEY, PEER_KEY[:8], 'nobody'),
    'message': ('hi', 'hello mesh', '\u00fc ' * 10), 'mesh': ('alpha',) * 9 + ('beta',),
    'priority': ('now', 'next', 'low'), 'client_message_id': tuple('cm-%d' % i for i in range(50)),
    'ttl': (1, 60, 3600), 'token': ('0123abcd' * 8, 'cafe' * 16, 'f00d' * 16, '9' * 64),
    'session_id': tuple('sess-%d' % i for i in range(9)), 'pid': (os.getpid(), 1, 424242),
    'display_name': tuple('agent-%d' % i for i in range(9)), 'cwd': ('/tmp',),
    'groups': (['team'],), 'since': ('2026-01-01T00:00:00Z',), 'from': (PEER_KEY,),
    'before': ('2030-01-01T00:00:00Z',), 'limit': (1, 10, 100), 'ids': (['row-1'], ['r2', 'r3']),
    'status': ('pending', 'inflight', 'dead', 'done', 'aborted'), 'id': ('row-1', 'row-2'),
}
BY_TYPE = {'integer': 1, 'number': 1.5, 'boolean': True, 'object': {'k': 'v'}, 'array': ['x']}
# Optional in rpc.list's signature but required by the handler: nearly always sent.
HANDLER_REQUIRED = ('to', 'message', 'token', 'session_id', 'mesh', 'display_name', 'pid',
                    'ids', 'id')
# Values that replace a request's own fields (a junk value and another method's name too).
REQUEST_SHAPES = {
    'params': ([], [1, 'x'], 'params', 5, None, True, 1.5, [{}], {'': None}),
    'id': (0.5, 2.0, True, False, None, {}, [], [1], {'id': 1}, '', 'x\ud800', 'z' * 10000, 0,
           2 ** 64, float('nan'), float('inf'), -0.0),
    'jsonrpc': ('1.0', 2.0, 2, '2', None, '', '2.0 ', ['2.0'], '2.\ud8000'),
    'method': ('SEND', 'send.', ' send', 'send\x00', '', 'se\ud800nd', 'rpc.', 'rpc.list.x',
               '__init__', 'daemon', None, 5, True, 'x' * 100, 'x' * 50000, ['send'], {'a': 1}),
}

# Every verb the broker serves after a hello (the test adds whatever BrokerServer.verbs
# lists) and plausible values of its fields: one is drawn per field, OMIT leaves it out.
OMIT, ME, OTHER = '<omit>', '<my key>', '<the other key>'
TARGETS = {'target': ('nobody', 'ghost', 'zz')}
GROUP = {'name': ('team', 'a/b', 'ops', 'g1', 'g2'), 'role': ('lead', OMIT)}
FRAME_FIELDS = {
    'send': {'targetSpec': (OTHER, OTHER, '*', '@all', '@team', ME, '#topic', 'bob'),
             'priority': ('now', 'next', 'low'), 'nonce': ('A' * 32,),
             'ciphertext': ('aGVsbG8=', 'QUJD' * 50), 'client_message_id': ('cm-1', 'cm-2', OMIT),
             'request_fingerprint': ('ab' * 32, OMIT)},
    'client_ack': {'clientMessageId': ('cm-1', 'cm-2'), 'brokerMessageId': ('0' * 32, 'f' * 32)},
    'meshd_undelivered_ack': {'messageId': ('0' * 32,)}, 'list_peers': {},
    'set_status': {'status': ('idle', 'working', 'dnd')}, 'set_summary': {'summary': ('busy',)},
    'set_visible': {'visible': (True, True, False)},
    'set_profile': {'avatar': ('a.png',), 'title': ('t',), 'bio': ('b',),
                    'capabilities': (['x'],)},
    'set_stats': {'stats': ({'messagesIn': 3, 'messagesOut': 1, 'toolCalls': 2, 'errors': 0},)},
    'join_group': GROUP, 'leave_group': GROUP,
    'kick': dict(TARGETS, stale=(1000, 60000, OMIT, OMIT)),
    'disconnect': dict(TARGETS, stale=(1000, 60000, OMIT, OMIT)),
    'ban': TARGETS, 'unban': TARGETS, 'list_bans': {},
    'set_state': {'key': ('k1', 'k2', 'k3'), 'value': ({'n': 1}, 'x', 1, None, [1, 2], True)},
    'get_state': {'key': ('k1', 'k2', 'k3')}, 'list_state': {},
    'remember': {'content': ('note',), 'tags': (['a', 'b'],)}, 'recall': {'query': ('note', '')},
    'forget': {'memoryId': ('0' * 32,)}, 'list_skills': {'query': ('note', '')},
    'share_skill': {'name': ('skill-1', 'skill-2'), 'description': ('d',),
                    'instructions': ('i',), 'tags': (['t'],), 'manifest': ({'v': 1},)},
    'get_skill': {'name': ('skill-1', 'skill-2')}, 'remove_skill': {'name': ('skill-1',)},
}
FRAME_SHAPES = {'_reqId': (5, None, True, {}, [], '', 'x' * 5000, 'r\ud800'),
                'type': ('SEND', 'send ', '', None, 5, ['send'], {'type': 'send'}, 'hello',
                         'session_hello', 'unknown', 'se\ud800nd', 'x' * 3000)}
# What the broker may answer a frame before any hello (the ack: an oversize `send`, §4.1).
PRE_HELLO_REPLIES = ('error no_hello', 'error invalid_json', 'error payload_too_large',
                     'ack payload too large')

# Values of hello fields a broker must refuse (spec/wire.md §3.1-§3.2 types the fields).
OPTIONAL_HELLO_FIELDS = ('hostname', 'peerType', 'channel', 'model', 'displayName',
                         'parentMemberId')
WRONG_TYPES = (0, -1, 1.5, True, False, {}, {'a': 1}, [], ['x'], 10 ** 30)
BAD_HELLO_VALUES = {
    'pid': (-1, -2 ** 31, -10 ** 30, 10 ** 30, 2 ** 63, 2 ** 64, 1.5, '4242', True, None, {},
            [4242], '42\ud80042'),
    'timestamp': ('1700000000000', None, {}, 'NaN', 1e308, 10 ** 30, -1, 1.5),
    'type': ('Hello', 'hello ', 'HELLO', 'session_hello ', 'SESSION_HELLO', 'hel\ud800lo'),
    'parentAttestation': (None, 'x', [], 5),
}


# ------------------------------------------------------------------ reporting

def clip(data, limit=300):
    """`data` (bytes, str or a JSON value) as ASCII text cut to about `limit` characters."""
    text = ascii(data) if isinstance(data, (bytes, str)) else json.dumps(data, default=ascii)
    return text if len(text) <= limit else '%s... [%d chars]' % (text[:limit], len(text))


class Findings(object):
    """Problems by kind, each with the distinct inputs that showed it."""

    def __init__(self, label):
        self.label = label
        self.kinds = collections.OrderedDict()

    def add(self, kind, data):
        self.kinds.setdefault(kind, collections.Counter())[clip(data)] += 1

    def report(self):
        out = ['%s: %d kind(s) of problem; seed %d (replay with MESHD_FUZZ_SEED=%d)'
               % (self.label, len(self.kinds), SEED, SEED)]
        for kind, inputs in self.kinds.items():
            out.append('- %s [x%d]' % (kind, sum(inputs.values())))
            out.extend('    %s%s' % (text, '  [x%d]' % count if count > 1 else '')
                       for text, count in list(inputs.items())[:SHOWN])
            if len(inputs) > SHOWN:
                out.append('    ... and %d more distinct inputs' % (len(inputs) - SHOWN))
        return '\n'.join(out)


# ------------------------------------------------------------------ values

def surrogate(rng, base=None):
    """`base` (or a word) with a lone UTF-16 surrogate, which JSON escapes and UTF-8 can't."""
    if not isinstance(base, str) or len(base) > 200:
        base = rng.choice(('', 'x', 'name', 'team'))
    pos = rng.randint(0, len(base))
    return base[:pos] + rng.choice(SURROGATES) * rng.choice((1, 1, 2)) + base[pos:]


def long_string(rng, low=4096, high=100 * 1024):
    """`low`..`high` bytes of JSON: a path of thousands of levels ('a/a/...'), text ending
    in a surrogate, or one character repeated."""
    size, r = rng.randint(low, high), rng.random()
    if r < 0.3:
        return 'a/' * (size // 2)
    if r < 0.4:
        return 'x' * size + rng.choice(SURROGATES)
    char = rng.choice(('x', ' ', '\u00e9', '\U0001f600', '\\', '\u4e2d'))
    return char * max(1, size // (len(json.dumps(char)) - 2))


def text(rng):
    """An odd string: special, number-like, a surrogate, control characters, near-miss hex."""
    r = rng.random()
    if r < 0.34:
        return rng.choice(ODD_STRINGS + NAN_LIKE)
    if r < 0.54:
        return surrogate(rng)
    if r < 0.56:
        return long_string(rng)
    if r < 0.85:
        return ''.join(rng.choice('abcXYZ019 -_./:@#*\u00e9\u4e2d\U0001f600\x00\x1f\x7f\t\n"\\')
                       for _ in range(rng.randint(0, 24)))
    return ''.join(rng.choice('0123456789abcdef') for _ in range(rng.choice((8, 63, 64, 65, 128))))


def scalar(rng):
    r = rng.random()
    if r < 0.24:
        return None if r < 0.12 else r < 0.18
    return rng.choice(NUMBERS) if r < 0.5 else text(rng)


def nested(rng):
    """A scalar wrapped in up to MAX_DEPTH arrays and objects."""
    value = scalar(rng) if rng.random() < 0.8 else rng.choice(([], {}))
    for _ in range(rng.randint(2, MAX_DEPTH)):
        if rng.random() < 0.5:
            value = [value] if rng.random() < 0.7 else [value, scalar(rng)]
        else:
            value = {rng.choice(('a', '', 'k', '__proto__', '\ud800', 'type', 'id')): value}
    return value


def junk(rng):
    """Any JSON value: a scalar, a deep nesting, a small container or a wide one (< 64 KB)."""
    r = rng.random()
    if r < 0.55:
        return scalar(rng)
    if r < 0.75:
        return nested(rng)
    if r < 0.8:
        size, item = rng.randint(500, 20000), rng.choice(('', 0, 'x', None, True, {}, []))
        return [item] * size if r < 0.785 else {'k%d' % i: item for i in range(size // 4)}
    if r < 0.9:
        return [scalar(rng) for _ in range(rng.randint(0, 5))]
    return {rng.choice(('a', 'b', 'name', '', 'x y', '\ud800k')): scalar(rng)
            for _ in range(rng.randint(0, 5))}


def mutate(rng, fields, types, numeric=()):
    """One mutation of `fields` (request params, or a frame): a wrong type, a lone surrogate,
    a field dropped or added, an odd string, a huge or odd number (into a `numeric` field
    when there is one), a deep nesting, or a string up to 60 KB ('a/a/...' paths too)."""
    how = rng.choice(('wrong type', 'wrong type', 'surrogate', 'surrogate', 'drop', 'extra',
                      'text', 'text', 'number', 'number', 'nested', 'long', 'long'))
    name = rng.choice((numeric if how == 'number' else ()) or list(types) or ['x'])
    kind, value = types.get(name, 'any').rstrip('?'), fields.get(name)
    if how == 'wrong type':     # any value for an `any`
        expected, value = JSON_TYPES.get(kind), junk(rng)
        while expected and isinstance(value, expected) \
                and isinstance(value, bool) == (expected is bool):
            value = junk(rng)
        fields[name] = value
    elif how == 'surrogate':
        fields[name] = ([surrogate(rng)] if kind == 'array' or isinstance(value, list) else
                        {surrogate(rng): surrogate(rng)} if kind == 'object' else
                        surrogate(rng, value))
    elif how == 'drop':
        fields.pop(name, None)
    elif how == 'extra':
        fields[rng.choice(EXTRA_FIELDS)] = junk(rng)
    else:
        fields[name] = {'text': text, 'number': lambda rng: rng.choice(NUMBERS), 'nested': nested,
                        'long': lambda rng: long_string(rng, 1024, 60 * 1024)}[how](rng)


def encode(rng, obj):
    """JSON bytes: mostly ASCII; a quarter raw UTF-8, lone surrogates as CESU-8 bytes (which
    json.loads of bytes reads back as the same lone surrogates)."""
    separators = (',', ':') if rng.random() < 0.7 else (', ', ': ')
    if rng.random() < 0.25:
        dumped = json.dumps(obj, ensure_ascii=False, separators=separators)
        return dumped.encode('utf-8', 'surrogatepass')
    return json.dumps(obj, separators=separators).encode('ascii')


def corrupt(rng, data):
    """`data` cut, a byte replaced, bytes inserted, a BOM or junk added, or in UTF-16/32."""
    pos = rng.randrange(max(1, len(data)))
    return rng.choice((
        data[:pos], data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1:],
        data[:pos] + rng.randbytes(rng.randint(1, 8)) + data[pos:], b'\xef\xbb\xbf' + data,
        data + rng.choice((b' x', b'}', b'{}', b',', b' ' + data)),
        data.decode('ascii', 'replace').encode(rng.choice(('utf-16-le', 'utf-16', 'utf-32')))))


def raw(rng, templates, depth):
    """JSON no serializer writes (RAW_VALUES in a template), or nesting as deep as `depth`."""
    if rng.random() < 0.15:     # far past any recursion limit, never near it
        return rng.choice((b'[', b'{"a":', b'[{"":')) * rng.randint(depth // 10, depth)
    return rng.choice(templates).replace(b'X', rng.choice(RAW_VALUES))


# ------------------------------------------------------------------ RPC lines

def rpc_request(rng, methods, counter):
    """A request for a random method: plausible params, then (85%) one to three mutations
    of its params or (a quarter of them) of its id, method, version or shape."""
    method = rng.choice(methods)
    n, types = next(counter), method['params']
    params = {name: (rng.choice(RPC_PARAMS[name]) if name in RPC_PARAMS
                     else BY_TYPE.get(kind.rstrip('?'), 'x'))
              for name, kind in types.items()
              if not kind.endswith('?') or name in HANDLER_REQUIRED or rng.random() < 0.85}
    obj = {'jsonrpc': '2.0', 'id': rng.choice((n, n, 'r%d' % n, 10 ** 20 + n, -n, '\u00fc-%d' % n)),
           'method': method['name']}
    if params or rng.random() < 0.5:
        obj['params'] = params
    r = rng.random()
    for _ in range(0 if r < 0.15 else 1 if r < 0.75 else rng.choice((1, 2, 3))):
        if r < 0.75 or rng.random() < 0.6:      # numbers go to the integer params
            mutate(rng, params, types, [name for name, kind in types.items()
                                        if kind.rstrip('?') in ('integer', 'number')])
            obj['params'] = params
            continue
        field = rng.choice(('params', 'id', 'jsonrpc', 'method', 'drop', 'extra'))
        if field == 'drop':     # without an id: a notification
            obj.pop(rng.choice(('params', 'id', 'id', 'jsonrpc', 'method')), None)
        elif field == 'extra':
            obj[rng.choice(('extra', 'result', 'error', 'Params', '\ud800', ''))] = junk(rng)
        else:
            obj[field] = rng.choice(REQUEST_SHAPES[field] + (junk(rng),
                                                             rng.choice(methods)['name']))
    return obj


def rpc_line(rng, methods, counter):
    """One input line (bytes ending in a newline; no piece of it over MAX_LINE)."""
    while True:
        r = rng.random()
        if r < 0.62:
            data = encode(rng, rpc_request(rng, methods, counter))
        elif r < 0.7:       # a batch of requests, notifications and junk
            data = encode(rng, [rpc_request(rng, methods, counter) if rng.random() < 0.7 else
                                rng.choice((scalar(rng), [], {},
                                            [rpc_request(rng, methods, counter)]))
                                for _ in range(rng.choice((0, 1, 2, 3, 5, 8, 12)))])
        elif r < 0.78:
            data = corrupt(rng, encode(rng, rpc_request(rng, methods, counter)))
        elif r < 0.85:
            data = raw(rng, RAW_LINES, 100000)
        elif r < 0.88:
            data = bytes(rng.choice(WHITESPACE) for _ in range(rng.randint(0, 20)))
        elif r < 0.94:
            data = rng.randbytes(rng.randint(1, 400))
        else:
            data = rng.choice((b'1', b'"x"', b'null', b'true', b'[]', b'{}', b'[1,2]', b'[null]',
                               b'[{}]', b'[[]]', b'""', b'-0', b'1e999', b'\xc2\xa0', b'\r',
                               b'{"jsonrpc":"2.0"}', b'{"method":"daemon.version"}'))
        if all(len(piece) < MAX_LINE for piece in data.split(b'\n')):
            return data + b'\n'


def owed_ids(line):
    """The id (as JSON) of each answer the daemon owes `line`, read as rpc.server reads it;
    null ids (a parse error, an invalid request) answer no request with an id."""
    ids = []
    for piece in line.split(b'\n')[:-1]:   # with its newline (UTF-16 text then fails)
        try:
            message = json.loads(piece + b'\n')
        except (ValueError, RecursionError):
            continue
        for item in message if isinstance(message, list) else [message]:
            if isinstance(item, dict) and isinstance(item.get('id'), (str, int)) \
                    and not isinstance(item['id'], bool):
                ids.append(json.dumps(item['id']))
    return ids


def check_exchange(chunk, answers, status, findings):
    """Check the answers to `chunk` (the lines before one sync request) into `findings`."""
    owed, got, owner = collections.Counter(), collections.Counter(), {}
    for line in chunk:
        for key in owed_ids(line):
            owed[key] += 1
            owner.setdefault(key, line)
    for raw_answer, answer in answers:
        for item in answer if isinstance(answer, list) and answer else [answer]:
            if not (isinstance(item, dict) and item.get('jsonrpc') == '2.0' and 'id' in item
                    and ('result' in item) != ('error' in item)):
                findings.add('an answer that is not a JSON-RPC 2.0 response', raw_answer)
                continue
            key = json.dumps(item['id'])
            if item['id'] is not None:
                got[key] += 1
            if (item.get('error') or {}).get('code') == INTERNAL_ERROR:
                findings.add('internal error -32603', owner.get(key, b''.join(chunk)))
    if status != 'ok':
        for line in chunk:
            findings.add('no answer within %.0fs (hang)' % DEADLINE if status == 'hang' else
                         'the daemon closed the connection (no line was over 1 MiB)', line)
        return
    for key in owed - got:
        findings.add('a request with an id got no answer', owner[key])
    for key in got - owed:
        findings.add('an answer with an unexpected or repeated id', owner.get(key, key))


def read_answers(rfile, sync_id):
    """(the answer lines before the answer to `sync_id`, 'ok'), or (..., 'closed')."""
    answers = []
    for line in rfile:
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if isinstance(answer, dict) and answer.get('id') == sync_id:
            return answers, 'ok'
        answers.append((line, answer))
    return answers, 'closed'


class RpcFuzzTest(MeshdTestCase):
    """A real daemon (one mesh, an unreachable broker, so `send` queues) under fuzzed lines."""

    def test_fuzzed_lines_get_no_internal_error_crash_hang_or_leak(self):
        """Guards the JSON-RPC line parser and every method's parameter handling.

        20,000 lines (mutated requests for each method rpc.list lists but events.subscribe,
        batches, invalid JSON, binary garbage, whitespace), pipelined on four connections
        with a daemon.version sync request every 25 lines: no -32603, each request with an id
        answered once, no close or hang, no traceback or error in stderr, the daemon alive
        and its RSS < baseline + 64 MiB; a line over 1 MiB gets payload_too_large and a close.
        """
        started = time.monotonic()
        self.write_config([make_mesh('alpha', broker_url='ws://127.0.0.1:9/ws')])
        self.daemon = self.start_daemon()
        methods = [method for method in self.daemon.call('rpc.list')['methods']
                   if method['name'] != 'events.subscribe']
        rng, counter = random.Random(SEED), iter(range(1, 10 ** 9))
        lines = [rpc_line(rng, methods, counter) for _ in range(RPC_LINES)]
        process = psutil.Process(self.daemon.pid)
        self.daemon.call('daemon.health')
        baseline = process.memory_info().rss
        chunks = [lines[i:i + RPC_CHUNK] for i in range(0, len(lines), RPC_CHUNK)]
        findings = Findings('RPC fuzz (%d lines)' % len(lines))
        hung = []

        def worker(index):
            status = 'closed'
            for number in range(index, len(chunks), RPC_CONNECTIONS):
                if status == 'closed':
                    conn = Raw.unix(self.daemon.socket)
                    conn.sock.settimeout(None)      # reads are bounded by a gevent.Timeout
                    self.addCleanup(conn.close)
                sync_id = 'sync-%d' % number
                reader = gevent.spawn(read_answers, conn.rfile, sync_id)    # reads as we write
                sync = json.dumps({'jsonrpc': '2.0', 'id': sync_id, 'method': 'daemon.version'})
                try:
                    with gevent.Timeout(DEADLINE):
                        try:
                            conn.send(b''.join(chunks[number]) + sync.encode() + b'\n')
                        except OSError:
                            pass        # the daemon closed the connection: the reader ends
                        answers, status = reader.get()
                except gevent.Timeout:
                    reader.kill()
                    answers, status = [], 'hang'
                    hung.append(number)
                check_exchange(chunks[number], answers, status, findings)
                if hung:
                    return

        gevent.joinall([gevent.spawn(worker, index) for index in range(RPC_CONNECTIONS)],
                       raise_error=True)
        rss = 0
        if self.daemon.proc.poll() is not None:
            findings.add('the daemon exited', 'status %s; stderr ends with %s' % (
                self.daemon.proc.returncode, self.daemon.stderr()[-1000:]))
        elif not hung:
            rss = process.memory_info().rss
            if rss > baseline + 64 * MIB:
                findings.add('daemon RSS grew by more than 64 MiB',
                             '%.1f MiB -> %.1f MiB' % (baseline / MIB, rss / MIB))
            # One line over 1 MiB: one payload_too_large answer, then the daemon closes.
            conn = Raw.unix(self.daemon.socket)
            self.addCleanup(conn.close)
            conn.send(b'[' + b' ' * (MAX_LINE + 10) + b']\n')
            answers = [json.loads(answer) for answer in conn.read_to_end().splitlines()]
            if len(answers) != 1 or 'payload_too_large' not in str(answers[0].get('error')):
                findings.add('a line over 1 MiB: not one payload_too_large answer', answers)
            self.assertEqual(self.daemon.call('daemon.version')['ipc_api'], 'v1')
        for line in self.daemon.stderr().splitlines():     # 'rpc method X failed' is an error
            if 'Traceback' in line or '"level":"error"' in line:
                findings.add('daemon stderr: an error or a traceback', line[:90] + ' ... ' +
                             line[-210:] if len(line) > 300 else line)
        print('\nRPC fuzz: seed %d, %d lines in %.1fs; daemon RSS %.1f -> %.1f MiB'
              % (SEED, len(lines), time.monotonic() - started, baseline / MIB, rss / MIB))
        if findings.kinds:
            self.fail(findings.report())


# ------------------------------------------------------------------ broker frames

def verb_frame(rng, verbs, me, other, n):
    """A plausible frame of a random verb from `me` (85%: mutated one to three times)."""
    verb = rng.choice(verbs)
    frame = {'type': verb, '_reqId': 'f-%d' % n, **({'id': 's-%d' % n} if verb == 'send' else {})}
    for field, choices in FRAME_FIELDS.get(verb, {}).items():
        value = rng.choice(choices)
        if value != OMIT:
            frame[field] = me.pub if value == ME else other.pub if value == OTHER else value
    for _ in range(0 if rng.random() < 0.15 else rng.choice((1, 1, 1, 2, 2, 3))):
        if rng.random() < 0.8:      # a huge `stale` once overflowed a timedelta
            mutate(rng, frame, dict.fromkeys(frame, 'any'), list(frame) + ['stale', 'visible'])
        else:
            field = rng.choice(('_reqId', 'type'))
            frame[field] = rng.choice(FRAME_SHAPES[field] + (junk(rng), rng.choice(verbs)))
    # A banned test member could not reconnect: a ban never names the other one.
    target = frame.get('target')
    if frame.get('type') == 'ban' and isinstance(target, str) and target and (
            target == other.name or other.pub.startswith(target)):
        frame['target'] = 'nobody'
    return frame


def broker_frame(rng, verbs, me, other, n, pre_hello=False):
    """(bytes, opcode, object or None) of one fuzzed frame from `me`."""
    while True:
        r, obj, opcode = rng.random(), None, TEXT
        if r < 0.8:
            obj = verb_frame(rng, verbs, me, other, n)
            data, opcode = encode(rng, obj), BINARY if rng.random() < 0.05 else TEXT
        elif r < 0.86:
            obj = rng.choice((scalar(rng), junk(rng), nested(rng),
                              [verb_frame(rng, verbs, me, other, n)]))
            data = encode(rng, obj)
        elif r < 0.91:      # never a corrupted ban: its target could become the other member
            data = corrupt(rng, encode(rng, verb_frame(
                rng, [verb for verb in verbs if verb != 'ban'], me, other, n)))
        elif r < 0.935:
            data = raw(rng, RAW_FRAMES, 30000)
        elif r < 0.975:
            data = rng.randbytes(rng.randint(0, 512))
            opcode = BINARY if rng.random() < 0.6 else TEXT
        elif r < 0.995:
            data = bytes(rng.choice(WHITESPACE) for _ in range(rng.randint(0, 8)))
        else:               # over MAX_MESSAGE_BYTES (64 KB), under the 1 MiB frame limit
            obj = verb_frame(rng, ('send', 'list_peers', 'set_summary'), me, other, n)
            obj['pad'] = 'p' * rng.randint(64 * 1024, 200 * 1024)
            data = encode(rng, obj)
        if not (pre_hello and b'hello"' in data):     # a hello would not be refused no_hello
            return data, opcode, obj


def reply_to(peer, data, opcode=TEXT):
    """Send `data`; the broker's first answer: 'hello_ack', 'error <code>', 'ack <error>',
    'close <code> <reason>', or what went wrong."""
    try:
        peer.send_raw(data, opcode)
        frame = peer.recv(DEADLINE)
    except websocket.WebSocketTimeoutException:
        return 'no reply (hang)'
    except (websocket.WebSocketException, OSError, ValueError) as exc:
        return 'dropped without a close, or not JSON (%r)' % exc
    if isinstance(frame, Closed):
        return 'close %s %s' % (frame.code, frame.reason)
    if frame.get('type') in ('error', 'ack'):
        return '%s %s' % (frame['type'], str(frame.get('code') or frame.get('error'))[:17])
    return str(frame.get('type'))


class FuzzPeer(object):
    """A member after its hello; `window` holds the (data, obj) it sent since its last sync.
    A reader greenlet keeps what the broker writes: were the socket full, a close frame queued
    behind unread frames would be lost when the broker closes."""

    def __init__(self, case, ident):
        self.case, self.ident, self.window, self.previous, self.reader = case, ident, [], [], None
        self.connect()

    def connect(self):
        if self.reader is not None:
            self.reader.kill()
        self.peer, _ack = self.case.hello(self.ident)
        self.frames, self.arrived = [], gevent.event.Event()
        self.reader = gevent.spawn(self._read, self.peer, self.frames)
        self.case.addCleanup(self.reader.kill)

    def _read(self, peer, frames):
        """Append each frame the broker writes, then the Closed or why the connection dropped."""
        try:
            frame = None
            while not isinstance(frame, Closed):
                frame = peer.recv(None)
                frames.append(frame)
                self.arrived.set()
        except (websocket.WebSocketException, OSError, ValueError) as exc:
            frames.append('dropped without a close frame (%r)' % exc)
            self.arrived.set()

    def send(self, data, opcode=TEXT):
        try:
            with gevent.Timeout(DEADLINE, AssertionError('a write blocked (hang); seed %d' % SEED)):
                self.peer.ws.send(data, opcode)
        except (websocket.WebSocketException, OSError):
            pass        # the connection is gone: the next sync point reads why

    def sync(self, req_id):
        """Send a list_peers; return (the frames before its reply, the reply, a Closed, why the
        connection dropped, or 'hang')."""
        self.send(json.dumps({'type': 'list_peers', '_reqId': req_id}).encode())
        deadline = time.monotonic() + HANG
        while True:
            self.arrived.clear()
            for index, frame in enumerate(self.frames):
                if not isinstance(frame, dict) or frame.get('_reqId') == req_id:
                    before = self.frames[:index]
                    del self.frames[:index + 1]
                    return before, frame
            if not self.arrived.wait(max(0.0, deadline - time.monotonic())):
                return list(self.frames), 'hang'


class BrokerFrameFuzzTest(BrokerTestMixin, unittest.TestCase):
    """The in-process broker (SQLite) under fuzzed frames, after and before a hello."""

    # No rate limit, so that sends reach the store and the fan-out; no capacity limit, so that
    # hellos the broker accepts never turn later ones away; dropped presences evicted at once.
    broker_kwargs = {'rate_limit': 'off', 'max_connections_per_mesh': 100000}
    timings = {'broker_grace': 0.2}

    def setUp(self):
        super().setUp()
        self.errors = []
        handler = logging.Handler(logging.ERROR)
        handler.emit = self.errors.append
        logging.getLogger('meshd.broker').addHandler(handler)
        self.addCleanup(logging.getLogger('meshd.broker').removeHandler, handler)
        self.process = psutil.Process()
        self.rss_before = self.rss_last = self.process.memory_info().rss
        self.syncs, self.jumps = 0, []  # the 3 largest RSS jumps in a window: (MiB, frames)

    def test_fuzzed_frames_after_hello_get_no_internal_error_crash_hang_or_leak(self):
        """Guards _handle and every verb handler (BrokerServer.verbs and `send`).

        alice (admin) and bob send 20,000 frames after their hellos: mutations of every verb
        (a `stale` of 2**63, groups of thousands of levels...), invalid JSON, binary frames,
        frames over MAX_MESSAGE_BYTES; a list_peers every 50 frames of a peer is a sync point.
        No error `internal` or ack 'internal error'; no close but an admin's disconnect (the
        peer reconnects); no sync point later than SLOW_SYNC; no ERROR record; /health and
        a fresh hello work after, and RSS grows < 128 MiB.
        """
        started = time.monotonic()
        peers = [FuzzPeer(self, self.member('alice', role='admin')),
                 FuzzPeer(self, self.member('bob'))]
        self.verbs = verbs = sorted(set(FRAME_FIELDS) | set(self.broker.verbs))
        rng = random.Random(SEED + 1)
        findings = Findings('broker frame fuzz (%d frames)' % BROKER_FRAMES)
        for n in range(BROKER_FRAMES):
            me, other = peers if rng.random() < 0.5 else peers[::-1]
            data, opcode, obj = broker_frame(rng, verbs, me.ident, other.ident, n)
            me.window.append((data, obj))
            me.send(data, opcode)
            if isinstance(obj, dict) and obj.get('type') == 'join_group' \
                    and len(str(obj.get('name'))) > 256:    # or every later drain would be slow
                me.send(json.dumps({'type': 'leave_group', 'name': obj['name']}).encode())
            if len(me.window) >= SYNC_EVERY or me.frames and not isinstance(me.frames[-1], dict):
                self._sync(me, peers, findings)
        for peer in peers:
            self._sync(peer, peers, findings)
        self._final_checks(findings)
        print('\nbroker frame fuzz: seed %d, %d frames in %.1fs; RSS growth %.1f MiB'
              % (SEED, BROKER_FRAMES, time.monotonic() - started,
                 (self.process.memory_info().rss - self.rss_before) / MIB))
        if findings.kinds:
            self.fail(findings.report())

    def _sync(self, peer, peers, findings):
        """A list_peers sync point: check what the broker wrote to `peer` since the last one."""
        self.syncs += 1
        began = time.monotonic()
        frames, reply = peer.sync('sync-%d' % self.syncs)
        took, rss = time.monotonic() - began, self.process.memory_info().rss
        last = clip([data for data, _obj in peer.window[-3:]])
        # What a slow or memory-hungry window is blamed on: the large frames a handler ran.
        suspects = [data for each in peers for data, obj in each.window if len(data) > 8192
                    and isinstance(obj, dict) and obj.get('type') in self.verbs] or [last]
        self.jumps = sorted(self.jumps + [((rss - self.rss_last) // MIB, suspects)],
                            key=lambda jump: jump[0])[-3:]
        self.rss_last = rss
        by_id = {obj[key]: data for data, obj in reversed(peer.previous + peer.window)
                 for key in ('_reqId', 'id')    # late acks answer the window before too
                 if isinstance(obj, dict) and isinstance(obj.get(key), str)}
        for frame in frames + [reply]:
            if not isinstance(frame, dict):
                continue
            if frame.get('code') == 'internal':
                kind = 'an error frame with code internal'
            elif frame.get('error') == 'internal error':
                kind = "an ack with error 'internal error'"
            else:
                continue
            key = frame.get('_reqId', frame.get('id'))     # an ack has the id of its send
            culprit = by_id.get(key) if isinstance(key, str) else None
            if culprit:
                findings.add(kind, culprit)
            for data, obj in [] if culprit else peer.window:    # each frame a handler ran
                if isinstance(obj, dict) and obj.get('type') in self.verbs \
                        and not isinstance(obj.get('_reqId'), str):
                    findings.add(kind + ', answering one of these frames without a _reqId', data)
        if reply == 'hang':
            raise AssertionError('%s\nno answer to a sync point within %.0fs (hang) after: %s'
                                 % (findings.report(), HANG, clip(suspects)))
        for data in suspects if took > SLOW_SYNC else []:
            findings.add('a sync point took over %.0fs (the frames before it)' % SLOW_SYNC, data)
        if isinstance(reply, dict) and reply.get('type') == 'error':
            findings.add('list_peers answered %s after these frames' % reply.get('code'), last)
        elif not isinstance(reply, dict):
            if not (isinstance(reply, Closed) and reply.code == 1000
                    and (reply.reason or '').startswith('disconnected')):
                findings.add('the broker closed the connection: %s (after these frames)'
                             % (reply,), last)
            peer.connect()      # after an admin's disconnect too
        peer.previous, peer.window = peer.window, []

    def test_fuzzed_hellos_are_refused_cleanly(self):
        """Guards the handshake (_hello, handshake.py) and the no_hello path.

        2,000 hellos and session_hellos, each on a fresh connection with one field mutated
        (pid -1 or 2**63, 16-60 KB strings, wrong types, surrogates, bad signatures...): an
        error and/or a close, never hello_ack, error `internal` or close 1011 (what the spec
        lets a broker ignore, like groups, may be accepted). Then 1,000 frames before any
        hello, 100 per connection, each get no_hello, invalid_json or payload_too_large. No
        ERROR record; /health and a fresh hello work after, and RSS grows < 128 MiB.
        """
        started = time.monotonic()
        carol, keys = self.member('carol'), crypto.generate_keypair()
        valid = {'hello': lambda: hello_frame(carol, model='opus'),
                 'session_hello': lambda: session_hello_frame(carol, *keys, model='opus')}
        for kind in valid:
            self.assertEqual(self._answer(valid[kind]()), 'hello_ack', 'the unmutated %s' % kind)
        rng = random.Random(SEED + 2)
        findings = Findings('broker hello fuzz (%d variants)' % HELLO_VARIANTS)
        for _ in range(HELLO_VARIANTS):
            kind = 'hello' if rng.random() < 0.6 else 'session_hello'
            frame = valid[kind]()
            field, must_refuse = hello_variant(rng, kind, frame)
            answer = self._answer(frame)
            refused = answer.startswith(('error', 'close')) and not answer.startswith(
                ('error internal', 'close 1011'))
            if not (refused or answer == 'hello_ack' and not must_refuse):
                findings.add('%s for a %s with a bad %s' % (answer, kind, field),
                             {field: frame.get(field)})
        rng, peer = random.Random(SEED + 3), None
        for n in range(PRE_HELLO_FRAMES):
            if peer is None or n % 100 == 0:    # far inside the broker's hello deadline
                if peer is not None:
                    peer.close()
                peer = self._connect()
            data, opcode, _obj = broker_frame(rng, sorted(FRAME_FIELDS), carol, carol, n,
                                              pre_hello=True)
            answer = reply_to(peer, data, opcode)
            if answer not in PRE_HELLO_REPLIES:
                findings.add('before hello: %s' % answer, data)
                peer.close()
                peer = None
        self._final_checks(findings)
        print('\nbroker hello fuzz: seed %d, %d variants and %d pre-hello frames in %.1fs'
              % (SEED, HELLO_VARIANTS, PRE_HELLO_FRAMES, time.monotonic() - started))
        if findings.kinds:
            self.fail(findings.report())

    def _connect(self):
        """A fresh connection, retried while 429 says earlier ones are still closing."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            try:
                return self.connect()
            except websocket.WebSocketBadStatusException as exc:
                if getattr(exc, 'status_code', None) != 429:
                    raise
                gevent.sleep(0.02)
        raise AssertionError('the broker refused connections with 429 for %ds' % DEADLINE)

    def _answer(self, frame):
        """The broker's first answer to `frame` sent on a fresh connection."""
        peer = self._connect()
        try:
            return reply_to(peer, json.dumps(frame))
        finally:
            peer.close()

    def _final_checks(self, findings):
        """ERROR records, /health, a fresh member's hello and this process's RSS growth."""
        for record in self.errors:
            findings.add('an ERROR record from %s' % record.name, '%s (%r)' % (
                record.getMessage(), record.exc_info and record.exc_info[1]))
        status, body, _headers = self.http_get('/health')
        if status != 200:
            findings.add('GET /health answered %d' % status, body)
        answer = self._answer(hello_frame(self.member('dave')))
        if answer != 'hello_ack':
            findings.add('a fresh member hello after the run', answer)
        growth = self.process.memory_info().rss - self.rss_before
        jumps = [(jump, frames) for jump, frames in self.jumps if jump >= 16]
        for jump, suspects in jumps if growth > 128 * MIB else []:
            for data in suspects:
                findings.add('RSS grew by %d MiB (over 128), by %d MiB in a window with these '
                             'frames' % (growth // MIB, jump), data)
        if growth > 128 * MIB and not jumps:
            findings.add('RSS grew by more than 128 MiB', '%.1f MiB' % (growth / MIB))


def hello_variant(rng, kind, frame):
    """Mutate one field of the valid `frame`; return (the field, whether it must be refused:
    groups, role and unknown fields the spec lets a broker ignore or clean up)."""
    r = rng.random()
    if r < 0.56:        # a string field (every one the valid frame has)
        field = rng.choice([k for k, v in frame.items() if isinstance(v, str) and k != 'type']
                           + ['displayName'])
        odd = ('h' * rng.randint(16 * 1024, 60 * 1024), surrogate(rng, frame.get(field))) * 4
        frame[field] = rng.choice(WRONG_TYPES + (nested(rng),) + odd
                                  + (() if field in OPTIONAL_HELLO_FIELDS else (None,)))
    elif r < 0.8:
        field = rng.choice(('pid', 'pid', 'timestamp', 'type'))
        frame[field] = rng.choice(BAD_HELLO_VALUES[field] + (
            (frame['timestamp'] + 600000,) if field == 'timestamp' else ()))    # 10 min skew
    elif r < 0.86 and (kind == 'hello' or r < 0.83):
        field, sig = 'signature', frame['signature']
        frame[field] = rng.choice((('0' if sig[0] != '0' else '1') + sig[1:], sig[:-2],
                                   sig + '00', 'zz' * 64))
    elif r < 0.86:
        field, key = 'parentAttestation', rng.choice(('expiresAt', 'signature', 'sessionPubkey',
                                                      'parentMemberPubkey', None))
        frame[field] = rng.choice(BAD_HELLO_VALUES[field]) if key is None else dict(
            frame[field], **{key: rng.choice((None, 'NaN', 1e308, -1, surrogate(rng), {},
                                              10 ** 30, 'ab' * 32))})
    elif r < 0.96:
        field = 'groups'
        frame[field] = rng.choice((
            'team', {'name': 'team'}, 5, [{'name': surrogate(rng, 'team')}],
            [{'name': 'team', 'role': surrogate(rng, 'lead')}], [{'name': 'x' * 30000}],
            [None, 1, 'x', {}], [{'name': 'a/' * rng.randint(5000, 25000)}], nested(rng)))
        return field, False
    else:
        field = rng.choice(('protocolVersion', 'capabilities', 'role', 'extra', '\ud800'))
        frame[field] = junk(rng)
        return field, False
    return field, True
