"""Who is who on each joined mesh: the address book (DESIGN.md 17).

Every roster a member link reads and every join event it receives teaches the book which
keys exist, which member each session key belongs to, and their names. The book lives in
memory and is written through to the `address_book` table (storage/address_book.py), so a
name reaches a member whose daemon is offline, and an inbox row names its sender although a
DM push carries no name. A claudemesh broker's join events carry no member key: such a key
is learnt at the next roster read.
"""
import logging

from storage.models import AddressBook

from meshd import clock

log = logging.getLogger(__name__)

REFRESH_MS = 60 * 1000      # how stale last_seen may get before an unchanged entry is written


class BookEntry:
    """One key seen on one mesh."""

    __slots__ = ('mesh', 'pubkey', 'member_pubkey', 'kind', 'name', 'last_seen_at')

    def __init__(self, mesh, pubkey, member_pubkey, kind, name, last_seen_at):
        self.mesh = mesh
        self.pubkey = pubkey
        self.member_pubkey = member_pubkey
        self.kind = kind
        self.name = name
        self.last_seen_at = last_seen_at


class Directory:
    """The address book, in memory, written through `store`'s group writer."""

    def __init__(self, store):
        self.store = store
        self._book = {}         # (mesh, pubkey) -> BookEntry

    def load(self):
        """Read the book at start (after the database opened)."""
        with self.store.reading():
            rows = AddressBook.every()
        for row in rows:
            self._book[(row.mesh, row.pubkey)] = BookEntry(
                row.mesh, row.pubkey, row.member_pubkey, row.kind, row.display_name,
                row.last_seen_at)

    # -- learning ----------------------------------------------------------------------

    def learn_roster(self, mesh, peers):
        """A roster of `mesh` was read: remember each key, its member and its name."""
        seen = []
        for peer in peers or []:
            if not isinstance(peer, dict):
                continue
            pubkey = _key(peer.get('pubkey'))
            if pubkey is None:
                continue
            member = _key(peer.get('memberPubkey')) or pubkey
            kind = 'member' if member == pubkey else 'session'
            seen.append((pubkey, member, kind, _name(peer.get('displayName'))))
            if kind == 'session' and (mesh, member) not in self._book:
                seen.append((member, member, 'member', None))
        self._remember(mesh, seen)

    def learn_event(self, mesh, data):
        """A peer joined, returned or left: its name (and member, when the broker said)."""
        pubkey = _key(data.get('pubkey'))
        if pubkey is None:
            return
        member = _key(data.get('memberPubkey'))
        known = self._book.get((mesh, pubkey))
        if member is None and known is None:
            return      # whose session it is comes with the next roster read
        member = member or known.member_pubkey
        kind = 'member' if member == pubkey else 'session'
        self._remember(mesh, [(pubkey, member, kind, _name(data.get('name')))])

    def _remember(self, mesh, seen):
        now = clock.now_ms()
        changed = []
        for pubkey, member, kind, name in seen:
            entry = self._book.get((mesh, pubkey))
            if entry is None:
                entry = self._book[(mesh, pubkey)] = BookEntry(mesh, pubkey, member, kind,
                                                               name, now)
            elif (entry.member_pubkey, entry.kind) == (member, kind) and (
                    name is None or name == entry.name) and now - entry.last_seen_at < REFRESH_MS:
                continue
            entry.member_pubkey, entry.kind = member, kind
            entry.name = name or entry.name
            entry.last_seen_at = now
            changed.append((pubkey, member, kind, name))
        if changed:
            # Nobody waits for this write: a lost refresh only costs a later name lookup.
            self.store.writer.submit(AddressBook.learn, mesh, changed, now)

    # -- asking --------------------------------------------------------------------------

    def entry(self, mesh, pubkey):
        return self._book.get((mesh, (pubkey or '').lower()))

    def sender(self, mesh, pubkey):
        """(display name, member key) of a sender key as last seen, or (None, None)."""
        entry = self.entry(mesh, pubkey)
        if entry is None:
            return None, None
        return entry.name, entry.member_pubkey

    def members(self, mesh):
        """The members seen on `mesh`, most recently seen last."""
        return sorted((e for e in self._book.values() if e.mesh == mesh and e.kind == 'member'),
                      key=lambda e: e.last_seen_at)

    def knows(self, pubkey, mesh=None):
        """Whether any roster or event of `mesh` (or any mesh) ever showed this key, as a
        member's key or a session's."""
        pubkey = (pubkey or '').lower()
        return any(entry.pubkey == pubkey or entry.member_pubkey == pubkey
                   for (slug, _key), entry in self._book.items() if mesh in (None, slug))


def _key(value):
    return value.lower() if isinstance(value, str) and len(value) == 64 else None


def _name(value):
    return value if isinstance(value, str) and value.strip() else None
