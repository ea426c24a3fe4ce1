"""argh 0.26 (Debian 12) and 0.31 (PyPI) alike: the same options, help and groups.

argh 0.30 renamed `namespace=` to `group_name=` (DESIGN.md 23). 0.31 also merges an option
declared with `@arg('--mesh')` with the `-m` it infers from the signature, where 0.26 keeps
only what was declared, so the same command had `-m` in a virtualenv and not from the .deb.
`arg` declares that short form itself, by 0.31's rule (the first letter of an option whose
first letter no other option of the command shares; never -h), so both read the same. Help
is formatted without argh's `(default: …)` suffixes, and a group's summary is its `title`.
"""
import argparse
import inspect

import argh
import argh.assembling

HELP_FORMAT = {'formatter_class': argparse.RawDescriptionHelpFormatter}


def arg(*names, **kwargs):
    """`argh.arg`, with the short option that argh 0.31 would infer added explicitly."""
    def decorate(function):
        long_names = [n for n in names if n.startswith('--')]
        short = _inferred_short(function, long_names[0]) if long_names else None
        declared = tuple(names)
        if short is not None and short not in declared:
            declared = (short,) + declared
        return argh.arg(*declared, **kwargs)(function)
    return decorate


def _inferred_short(function, long_name):
    params = inspect.signature(function).parameters.values()
    named = [p.name for p in params
             if p.default is not p.empty or p.kind is p.KEYWORD_ONLY]
    firsts = [name[0] for name in named]
    letter = long_name[2:3]
    if not letter or letter == 'h' or firsts.count(letter) != 1:
        return None
    if long_name[2:].replace('-', '_') not in named:
        return None
    return '-' + letter


def command_name(function):
    """The name argh gives `function`'s command: its @named name, or its own with dashes."""
    return getattr(function, 'argh_name', function.__name__.replace('_', '-'))


def add_commands(parser, functions):
    """Add `functions` as `prog <command>`."""
    if parser._subparsers is None:     # created here, so usage says COMMAND, not all of them
        parser.add_subparsers(metavar='COMMAND', title='commands')
    if functions:                      # none when the parser is built for one group
        parser.add_commands(functions, func_kwargs=HELP_FORMAT)


def add_group(parser, name, functions, help_text):
    """Add `functions` as `prog NAME <command>`, with `help_text` as the group's summary."""
    params = inspect.signature(argh.assembling.add_commands).parameters
    if 'group_name' in params:
        parser.add_commands(functions, group_name=name, func_kwargs=HELP_FORMAT,
                            group_kwargs={'title': help_text, 'metavar': 'COMMAND'})
    else:
        parser.add_commands(functions, namespace=name, func_kwargs=HELP_FORMAT,
                            namespace_kwargs={'title': help_text, 'metavar': 'COMMAND'})
