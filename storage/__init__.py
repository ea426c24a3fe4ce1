"""meshd's local storage: peewee models on one SQLite file, migrations, one writer path.

This package never imports `meshd` (DESIGN.md 1): the daemon wires it in.
"""
