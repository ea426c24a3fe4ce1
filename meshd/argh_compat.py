"""Registering argh subcommand groups on argh 0.26 (Debian 12) and 0.31 (PyPI) alike.

argh 0.30 renamed `namespace=` to `group_name=` (DESIGN.md 23); everything else meshd uses
reads the same under both, as long as every option is declared explicitly.
"""
import inspect

import argh.assembling


def add_group(parser, name, functions, help_text):
    """Add `functions` as `prog NAME <command>`."""
    params = inspect.signature(argh.assembling.add_commands).parameters
    if 'group_name' in params:
        parser.add_commands(functions, group_name=name, group_kwargs={'help': help_text})
    else:
        parser.add_commands(functions, namespace=name, namespace_kwargs={'help': help_text})
