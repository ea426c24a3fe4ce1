"""meshd's exception types: one-line classes under a common base (huey's exceptions.py).

Every error meshd raises on purpose is a MeshdError declared here. Its text is one line for
the user; `exit_code` is what the CLI exits with when the error ends a command (2 for a
usage or configuration mistake, 1 for everything that went wrong at run time). `cli.main`
is the one place that prints it and exits.

The storage errors come from storage/ (which never imports meshd) and are re-exported
here, so there is one StorageError whichever module a caller imports it from.
"""
from storage.errors import SchemaTooNewError, StorageError

__all__ = ['AdminError', 'ClaudeConfigError', 'CommandFailed', 'ConfigError', 'ControlError', 'DaemonExit',
           'DaemonExited', 'InviteError', 'LaunchError', 'MalformedInvite', 'MembershipError', 'MeshdError',
           'QuickstartError', 'SchemaTooNewError', 'SpawnTimeout', 'StopTimeout', 'StorageError', 'UsageError']

USAGE, RUNTIME = 2, 1


class MeshdError(Exception):
    """Base of every error meshd raises on purpose."""
    exit_code = RUNTIME


class UsageError(MeshdError):
    """A command line that cannot be carried out as written."""
    exit_code = USAGE


class ConfigError(MeshdError):
    """config.json or a command-line value cannot be used."""
    exit_code = USAGE


class CommandFailed(MeshdError):
    """A CLI command stops here: `message` is what the user reads, `exit_code` its status."""

    def __init__(self, message, exit_code=RUNTIME):
        super().__init__(message)
        self.exit_code = exit_code


class InviteError(MeshdError):
    """An invite cannot be used: expired, exhausted, refused by its broker."""


class MalformedInvite(InviteError):
    """What was given is not an invite link: a usage error."""
    exit_code = USAGE


class MembershipError(MeshdError):
    """A join, leave or import that cannot be done."""


class LaunchError(MeshdError):
    """The session cannot be launched."""


class QuickstartError(MeshdError):
    """A quickstart step failed."""


class AdminError(MeshdError):
    """A broker-admin command cannot be carried out."""


class ClaudeConfigError(MeshdError):
    """A Claude Code configuration file cannot be read or changed safely."""


class ControlError(MeshdError):
    """The daemon cannot be started, reached or stopped from another process."""


class DaemonExited(ControlError):
    """A daemon started in the background exited before its socket answered."""

    def __init__(self, status, tail, log_path):
        super().__init__('daemon exited with status %d: %s (log: %s)'
                         % (status, ' | '.join(tail) or 'no output', log_path))
        self.status = status
        self.exit_code = status or RUNTIME


class SpawnTimeout(ControlError):
    """A daemon started in the background did not answer on its socket in time."""

    def __init__(self, seconds, log_path):
        super().__init__('daemon spawn timeout: socket did not answer within %ds (log: %s)'
                         % (seconds, log_path))


class StopTimeout(ControlError):
    """The daemon was signalled but did not exit in time."""

    def __init__(self, pid, seconds):
        super().__init__('the daemon (pid %d) did not exit within %ds' % (pid, seconds))
        self.pid = pid


class DaemonExit(MeshdError):
    """Start-up cannot go on: print `message` (if any) on stderr and exit with `code`."""

    def __init__(self, code, message=None):
        super().__init__(message or '')
        self.code = code
        self.exit_code = code
        self.message = message
