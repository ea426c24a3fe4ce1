"""What every model of meshd.db shares: the database proxy, the base model, raw SQL helpers.

The models are bound to `database`, a proxy that the daemon's Store opens. Every statement
the daemon runs is a classmethod named for what it means, next to its model: callers run
writes through the store (`store.write(Outbox.claim, ids, now, lease_ms)`) and reads inside
`store.reading()`, and never write SQL of their own. The per-message paths are hand-written
SQL (building a peewee query cost more than running it). Models hold no network or crypto
code, and no clock: times are Unix epoch milliseconds passed in by the caller.
"""
from peewee import DatabaseProxy, Model

database = DatabaseProxy()


def placeholders(values):
    return ', '.join('?' * len(values))


def execute(sql, params=()):
    return database.execute_sql(sql, params)


def delete_batch(table, condition, params, limit):
    """Delete up to `limit` rows of `table` matching `condition`; return how many."""
    return execute('DELETE FROM "%s" WHERE rowid IN (SELECT rowid FROM "%s" WHERE %s LIMIT ?)'
                   % (table, table, condition), list(params) + [limit]).rowcount


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False
