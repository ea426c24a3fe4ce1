"""JSON-RPC framing, error codes and the one error type handlers raise (spec/daemon.md §8.1)."""
import json

# JSON-RPC 2.0 codes, then meshd's application codes (-32000..-32099).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
AUTH_ERROR = -32001
NOT_FOUND = -32002
CONFLICT = -32003
MESH_CHOICE = -32004
UPSTREAM_ERROR = -32005
UNAVAILABLE = -32006

MAX_LINE = 1024 * 1024           # a longer line answers payload_too_large and closes
DEFAULT_PARAMS_LIMIT = 64 * 1024  # params re-encoded as compact UTF-8 JSON


class RpcError(Exception):
    """An error answer: JSON-RPC `code`, human `message`, and `data` with a stable `code`."""

    def __init__(self, code, message, data=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = dict(data or {})

    @classmethod
    def of(cls, code, slug, message, **extra):
        """Build an error whose `data.code` is `slug`, with extra data fields."""
        data = {'code': slug}
        data.update(extra)
        return cls(code, message, data)

    def to_dict(self):
        return {'code': self.code, 'message': self.message, 'data': self.data}


def invalid_params(message, **extra):
    """The -32602 `invalid_params` error with `message`."""
    return RpcError.of(INVALID_PARAMS, 'invalid_params', message, **extra)


def encode(obj):
    """One compact JSON line, as bytes.

    A lone surrogate (JSON allows the escape `\\ud800`; UTF-8 cannot carry it) is written
    back as that escape, so echoing a client's odd id or method name never fails.
    """
    text = json.dumps(obj, separators=(',', ':'), ensure_ascii=False) + '\n'
    return text.encode('utf-8', 'backslashreplace')


def compact_size(obj):
    """Size in bytes of `obj` as compact UTF-8 JSON (how params limits are measured).

    Raises UnicodeEncodeError when a string holds a lone surrogate, which is not text.
    """
    return len(json.dumps(obj, separators=(',', ':'), ensure_ascii=False).encode('utf-8'))


def response(request_id, result):
    return {'jsonrpc': '2.0', 'id': request_id, 'result': result}


def error_response(request_id, error):
    return {'jsonrpc': '2.0', 'id': request_id, 'error': error.to_dict()}


def notification(method, params):
    return {'jsonrpc': '2.0', 'method': method, 'params': params}


def request(request_id, method, params=None):
    message = {'jsonrpc': '2.0', 'id': request_id, 'method': method}
    if params is not None:
        message['params'] = params
    return message
