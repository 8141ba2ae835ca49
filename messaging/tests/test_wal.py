"""SQLite checkpoints run beside the message writer, never in its commits."""

import os
import sqlite3
import threading
import time

import pytest
from channels.db import database_sync_to_async
from django.db import connection

from messaging import wal
from messaging.engine import engine

from .test_group_commit import outgoing

PAGE = 4096


def wal_database(tmp_path):
    path = tmp_path / "log.sqlite3"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (x BLOB)")
    setup.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    setup.close()
    return path


def fill(path, rows: int, *, checkpoints: bool):
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint=10")  # pages: any commit here would checkpoint
    if not checkpoints:
        wal.checkpoints_off(writer)
    for _ in range(rows):
        writer.execute("INSERT INTO t VALUES (randomblob(4000))")
    return writer


def test_a_connection_with_checkpoints_off_leaves_the_database_file_to_others(tmp_path):
    path = wal_database(tmp_path)
    size = path.stat().st_size
    quiet = fill(path, 100, checkpoints=False)
    assert path.stat().st_size == size
    # The same writes with SQLite's automatic checkpoints copy the log into the file.
    fill(path, 100, checkpoints=True)
    assert path.stat().st_size > size + 100 * PAGE
    quiet.close()


def test_the_checkpointer_copies_the_log_into_the_database_file(tmp_path, monkeypatch):
    monkeypatch.setattr(wal, "CHECKPOINT_INTERVAL", 0.01)
    path = wal_database(tmp_path)
    size = path.stat().st_size
    writer = fill(path, 100, checkpoints=False)
    checkpointer = wal.Checkpointer(path).start()
    deadline = time.monotonic() + 10
    while path.stat().st_size < size + 100 * PAGE and time.monotonic() < deadline:
        time.sleep(0.01)
    checkpointer.stop()
    assert path.stat().st_size >= size + 100 * PAGE
    assert checkpointer.checkpoints >= 1
    assert writer.execute("SELECT count(*) FROM t").fetchone() == (100,)


def test_the_checkpointer_takes_a_last_checkpoint_when_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(wal, "CHECKPOINT_INTERVAL", 3600)
    path = wal_database(tmp_path)
    size = path.stat().st_size
    checkpointer = wal.Checkpointer(path).start()
    fill(path, 50, checkpoints=False)
    assert path.stat().st_size == size
    checkpointer.stop()
    assert path.stat().st_size >= size + 50 * PAGE


def test_databases_in_memory_have_no_file_to_checkpoint():
    assert not wal.is_file(":memory:")
    assert not wal.is_file("file:hub?mode=memory&cache=shared")
    assert wal.is_file("/var/lib/hub/db.sqlite3")


@pytest.mark.django_db(transaction=True)
async def test_the_message_writer_never_checkpoints_and_its_checkpointer_does(
    alice, bob, monkeypatch
):
    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL checkpoints in its own processes")
    monkeypatch.setattr(wal, "CHECKPOINT_INTERVAL", 3600)  # only the last one, on close
    writer = engine()
    path = connection.settings_dict["NAME"]
    log = f"{path}-wal"
    await writer.send(outgoing(alice, "bob", "first"))
    before = _size(path)
    # One send per commit, until the log holds more than the 4,000 pages after which SQLite's
    # automatic checkpoint would have copied it into the file (and started the log over).
    for n in range(5000):
        await writer.send(outgoing(alice, "bob", n))
        if _size(log) > 4100 * PAGE:
            break
    assert _size(log) > 4100 * PAGE
    assert _size(path) == before
    await writer.close()
    assert _size(path) > before
    assert not any(thread.name.startswith("hub-") for thread in threading.enumerate())


def _size(path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _pragma(db, name: str) -> int:
    return db.execute(f"PRAGMA {name}").fetchone()[0]


@pytest.mark.django_db(transaction=True)
async def test_only_the_message_writer_keeps_a_large_cache_and_maps_the_file(
    alice, bob, monkeypatch
):
    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL caches pages in its own processes")
    seen = {}

    def look(db, *args, **kwargs):
        seen["writer"] = (_pragma(db, "cache_size"), _pragma(db, "mmap_size"))

    writer = engine()
    await writer.send(outgoing(alice, "bob", "first"))
    monkeypatch.setattr(writer, "_own_checkpoints", lambda: look(connection.connection))
    await writer.send(outgoing(alice, "bob", "second"))
    assert seen["writer"] == (-65536, 268435456)

    def others():
        connection.ensure_connection()
        return _pragma(connection.connection, "cache_size"), _pragma(
            connection.connection, "mmap_size"
        )

    # Every other connection (sockets' sessions, REST) caches 2 MB and reads through it.
    cache_size, mmap_size = await database_sync_to_async(others)()
    assert (cache_size, mmap_size) == (-2000, 0)
