"""What this daemon asked each mesh to show of its presences, in meshd.db.

The broker keeps a presence's status, summary, visibility, profile and groups only while the
presence lives (spec/wire.md §4.3): a daemon restart, or a reconnect after the grace window,
starts a fresh presence that shows none of them. The daemon keeps what was set per (mesh,
owner) — owner `member` for its member link, a session token for a session's link — and
sends it again every time that link opens.
"""
from peewee import CompositeKey, IntegerField, TextField

from storage.base import BaseModel, execute

MEMBER = 'member'


class PresenceSetting(BaseModel):
    """The settings of one link's presence, as one JSON object."""
    mesh = TextField()
    owner = TextField()
    settings = TextField()
    updated_at = IntegerField()

    class Meta:
        table_name = 'presence_settings'
        primary_key = CompositeKey('mesh', 'owner')

    @classmethod
    def put(cls, mesh, owner, settings_json, now):
        execute('INSERT INTO "presence_settings" ("mesh", "owner", "settings", "updated_at") '
                'VALUES (?, ?, ?, ?) ON CONFLICT ("mesh", "owner") DO UPDATE SET '
                '"settings" = excluded."settings", "updated_at" = excluded."updated_at"',
                (mesh, owner, settings_json, now))

    @classmethod
    def forget_owner(cls, owner):
        return execute('DELETE FROM "presence_settings" WHERE "owner" = ?', (owner,)).rowcount

    @classmethod
    def every(cls):
        return list(cls.select())
