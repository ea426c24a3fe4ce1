"""The daemon's local JSON-RPC methods (spec/daemon.md §8.2), in groups by what they use.

Each group is a class built with the narrow objects its methods need, never the Daemon,
and `handlers()` lists its methods as (name, function, registration options). A handler
takes the call context first (`ctx.session`, `ctx.conn`), validates what the method
table's type checks cannot express, and raises RpcError with a stable `data.code`.
Results use snake_case; times in inbox and outbox items are ISO strings.
"""


def register(methods, groups):
    """Add every method of `groups` to the method table `methods`."""
    for group in groups:
        for name, fn, options in group.handlers():
            methods.method(name, **options)(fn)
