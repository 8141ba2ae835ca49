"""The system checks of the messaging app."""

import sqlite3

import pytest
from django.core import checks
from django.db import connection


@pytest.mark.skipif(connection.vendor != "sqlite", reason="a check of SQLite's version")
@pytest.mark.parametrize(("version", "errors"), [((3, 32, 3), ["messaging.E001"]), ((3, 33), [])])
def test_start_up_stops_on_a_sqlite_too_old_for_the_message_writer(monkeypatch, version, errors):
    monkeypatch.setattr(sqlite3, "sqlite_version_info", version)
    found = [message for message in checks.run_checks() if message.id.startswith("messaging.")]
    assert [message.id for message in found] == errors
    if errors:
        assert "SQLite 3.33 or later is needed" in found[0].msg
        assert "DATABASE_URL" in found[0].hint
