"""meshd's exception types: one-line classes under a common base (huey's exceptions.py)."""


class MeshdError(Exception):
    """Base of every error meshd raises on purpose."""


class ConfigError(MeshdError):
    """config.json or a command-line value cannot be used."""


class StorageError(MeshdError):
    """The database cannot be opened, migrated or written."""


class BrokerError(MeshdError):
    """A broker refused or failed a request."""


class InviteError(MeshdError):
    """An invite link is malformed, expired or exhausted."""
