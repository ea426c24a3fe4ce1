"""meshd's exception types: one-line classes under a common base (huey's exceptions.py).

The storage errors come from storage/ (which never imports meshd) and are re-exported
here, so there is one StorageError whichever module a caller imports it from.
"""
from storage.errors import SchemaTooNewError, StorageError

__all__ = ['ConfigError', 'DaemonExit', 'InviteError', 'MeshdError', 'SchemaTooNewError',
           'StorageError']


class MeshdError(Exception):
    """Base of every error meshd raises on purpose."""


class ConfigError(MeshdError):
    """config.json or a command-line value cannot be used."""


class InviteError(MeshdError):
    """An invite link is malformed, expired or exhausted."""


class DaemonExit(MeshdError):
    """Start-up cannot go on: print `message` (if any) on stderr and exit with `code`."""

    def __init__(self, code, message=None):
        super().__init__(message or '')
        self.code = code
        self.message = message
