"""The address book of meshd.db: every member and session the daemon has seen on each mesh.

A name or a key prefix must reach a member whose daemon is offline (DESIGN.md 17), and an
inbox row must name its sender although a DM push carries no name: the book remembers what
rosters and join events said, by (mesh, key). A session row names its member, so a
session's DM is filed under its member too.
"""
from peewee import CompositeKey, IntegerField, TextField

from storage.base import BaseModel, delete_batch, execute

KINDS = ('member', 'session')


class AddressBook(BaseModel):
    """One key seen on one mesh: a member's key, or a session's and whose member it is."""
    mesh = TextField()
    pubkey = TextField()
    member_pubkey = TextField()
    kind = TextField()
    display_name = TextField(null=True)
    first_seen_at = IntegerField()
    last_seen_at = IntegerField()

    class Meta:
        table_name = 'address_book'
        primary_key = CompositeKey('mesh', 'pubkey')

    @classmethod
    def learn(cls, mesh, entries, now):
        """Insert or refresh `entries` of `mesh`: (pubkey, member_pubkey, kind, name); a name
        already known stays when the new one is None."""
        for pubkey, member_pubkey, kind, name in entries:
            execute('INSERT INTO "address_book" ("mesh", "pubkey", "member_pubkey", "kind", '
                    '"display_name", "first_seen_at", "last_seen_at") VALUES (?, ?, ?, ?, ?, ?, ?) '
                    'ON CONFLICT ("mesh", "pubkey") DO UPDATE SET '
                    '"member_pubkey" = excluded."member_pubkey", "kind" = excluded."kind", '
                    '"display_name" = COALESCE(excluded."display_name", "display_name"), '
                    '"last_seen_at" = excluded."last_seen_at"',
                    (mesh, pubkey, member_pubkey, kind, name, now, now))
        return len(entries)

    @classmethod
    def every(cls):
        return list(cls.select().order_by(cls.mesh, cls.last_seen_at))

    @classmethod
    def prune(cls, cutoff, limit):
        """Forget sessions not seen since `cutoff` (members stay: they can come back)."""
        return delete_batch('address_book', '"kind" = \'session\' AND "last_seen_at" < ?',
                            [cutoff], limit)


AddressBook.add_index(AddressBook.index(AddressBook.member_pubkey, name='address_book_member'))
