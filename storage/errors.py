"""The storage errors, one hierarchy for the daemon's database and the broker's.

storage/ never imports meshd (DESIGN.md 1); meshd.exceptions re-exports these, so a
caller catching StorageError also catches SchemaTooNewError, wherever it imports it from.
"""


class StorageError(Exception):
    """A database cannot be opened, migrated or written."""


class SchemaTooNewError(StorageError):
    """The database was written by a newer meshd than this one."""

    def __init__(self, found, head, what='database'):
        self.found = found
        self.head = head
        super().__init__('%s schema version %d is newer than this meshd supports (%d); '
                         'upgrade meshd or move the database aside' % (what, found, head))
