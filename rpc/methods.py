"""An explicit table of RPC methods, checked before every call (STYLE.md §4).

Methods are plain functions `fn(ctx, *, name: type = default, ...)` registered under a
dotted name. Nothing is reached by attribute lookup. Parameters are checked against the
signature and its annotations before the call, so a handler only ever sees well-typed
values; a `TypeError` raised inside a handler is an internal error, not bad parameters.
"""
import inspect

from rpc.protocol import (DEFAULT_PARAMS_LIMIT, INVALID_REQUEST, METHOD_NOT_FOUND,
                          RpcError, compact_size, invalid_params)

SESSION_MODES = ('none', 'optional', 'required')

# JSON type names shown by rpc.list, keyed by the annotation used in handlers.
_TYPE_NAMES = {str: 'string', int: 'integer', float: 'number', bool: 'boolean',
               dict: 'object', list: 'array', object: 'any'}


class Method:
    """A registered method: its handler, signature and how it is described and checked."""

    def __init__(self, name, fn, session, params_limit, result, stream, renames=None,
                 pipelined=False):
        self.name = name
        # May return rpc.server.Pending: the connection reads on while it completes.
        self.pipelined = pipelined
        # Wire names that are not Python identifiers (`from`) map to parameter names.
        self.renames = dict(renames or {})
        self._wire_names = {python: wire for wire, python in self.renames.items()}
        self.fn = fn
        self.session = session
        self.params_limit = params_limit
        self.result = result
        self.stream = stream
        self.signature = inspect.signature(fn)
        params = list(self.signature.parameters.values())[1:]
        # A handler with **extra takes parameters it does not name (MCP's `_meta` and the
        # fields later protocol revisions add); they reach it unchecked.
        self.open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
        self.params = [p for p in params if p.kind is not p.VAR_KEYWORD]
        self._known = {p.name: p for p in self.params}
        self._required = [p.name for p in self.params if p.default is inspect.Parameter.empty]
        doc = inspect.getdoc(fn) or ''
        self.help = doc.splitlines()[0] if doc else ''

    def describe(self):
        params = {}
        for param in self.params:
            type_name = _TYPE_NAMES.get(param.annotation, 'any')
            if param.default is not inspect.Parameter.empty:
                type_name += '?'
            params[self._wire_names.get(param.name, param.name)] = type_name
        return {'name': self.name, 'help': self.help, 'params': params,
                'result': self.result, 'session': self.session}

    def call(self, ctx, params):
        """Check `params` against the signature and annotations, then call the handler.

        The checks use what __init__ worked out once (`_known`, `_required`): inspecting the
        signature on every call cost more than a small method's own work."""
        if params:
            try:
                size = compact_size(params)
            except UnicodeEncodeError:
                # json accepts a lone surrogate escape; no handler, database or peer can
                # store it.
                raise invalid_params('params must be text: a string holds a lone UTF-16 '
                                     'surrogate')
            if size > self.params_limit:
                raise RpcError.of(INVALID_REQUEST, 'payload_too_large',
                                  'params exceed %d bytes' % self.params_limit)
            if self.renames or self._wire_names:
                for name in params:
                    if name in self._wire_names and name not in self.renames:
                        raise invalid_params('unknown parameter %r' % name)  # the wire name only
                params = {self.renames.get(name, name): value for name, value in params.items()}
            for name, value in params.items():
                param = self._known.get(name)
                if param is None:
                    if not self.open_ended:
                        raise invalid_params('unknown parameter %r' % name)
                elif param.annotation is not _ANY:
                    _check_type(param, value)
        for name in self._required:
            if name not in params:
                raise invalid_params('missing %r' % self._wire_names.get(name, name))
        return self.fn(ctx, **params)


_ANY = inspect.Parameter.empty


def _check_type(param, value):
    expected = param.annotation
    if expected is object:
        return
    if value is None and param.default is None:
        return  # an explicit null for an optional parameter means "not given"
    if expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise invalid_params('%r must be %s' % (param.name, _article(_TYPE_NAMES[expected])))


def _article(type_name):
    return ('an ' if type_name[0] in 'aeiou' else 'a ') + type_name


class MethodTable:
    """The method table. A name registered twice raises ValueError."""

    def __init__(self):
        self._methods = {}

    def method(self, name, session='none', params_limit=DEFAULT_PARAMS_LIMIT, result='object',
               stream=False, renames=None, pipelined=False):
        """Decorator registering `fn(ctx, **params)` as `name`."""
        if session not in SESSION_MODES:
            raise ValueError('session must be one of %s' % (SESSION_MODES,))

        def register(fn):
            self.add(Method(name, fn, session, params_limit, result, stream, renames,
                            pipelined))
            return fn
        return register

    def add(self, method):
        if method.name in self._methods:
            raise ValueError('method %r registered twice' % method.name)
        self._methods[method.name] = method

    def get(self, name):
        """The method called `name`, or the method_not_found error."""
        method = self._methods.get(name) if isinstance(name, str) else None
        if method is None:
            raise RpcError.of(METHOD_NOT_FOUND, 'method_not_found',
                              'method not found: %s' % (name,))
        return method

    def names(self):
        return sorted(self._methods)

    def describe(self):
        return [self._methods[name].describe() for name in self.names()]
