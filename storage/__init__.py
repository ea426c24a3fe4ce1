"""meshd's storage: one engine (store.py) for the daemon's database and the broker's, the
group writer, the migration runner, and the daemon's models and migrations.

This package never imports `meshd` (DESIGN.md 1): the daemon and the broker wire it in.
"""
