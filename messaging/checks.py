"""Checks Django runs before the hub starts (`manage.py check`, `migrate`, `make run`)."""

import sqlite3

from django.core import checks
from django.db import connections

# The message writer's statements on SQLite read their rows from a JSON array and update with
# `UPDATE ... FROM` (messaging/batch.py), which SQLite has since 3.33.
SQLITE_NEEDED = (3, 33)


@checks.register()
def sqlite_is_recent_enough(app_configs, **kwargs) -> list[checks.CheckMessage]:
    if not any(connections[alias].vendor == "sqlite" for alias in connections):
        return []
    if sqlite3.sqlite_version_info >= SQLITE_NEEDED:
        return []
    needed = ".".join(map(str, SQLITE_NEEDED))
    return [
        checks.Error(
            f"SQLite {needed} or later is needed; this Python's sqlite3 module has"
            f" {sqlite3.sqlite_version}.",
            hint="Use a Python built with a newer SQLite, or PostgreSQL (set DATABASE_URL).",
            id="messaging.E001",
        )
    ]
