"""Helpers for the messaging tests: WebSocket sessions against the real Redis layer."""

import asyncio
import sqlite3
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connection

from mcp_project.asgi import application
from messaging.engine import engine
from ops.lean_server import InputQueue


@pytest.fixture(autouse=True)
def isolated_channel_layer(settings):
    """Give each test its own key prefix in Redis, so no group or channel leaks between tests.

    Changing CHANNEL_LAYERS makes Channels drop its cached layer, so the next use builds a fresh
    one with this configuration.
    """
    layers = {alias: {**config} for alias, config in settings.CHANNEL_LAYERS.items()}
    default = layers["default"]
    if "CONFIG" in default:
        default["CONFIG"] = {**default["CONFIG"], "prefix": f"test-{uuid.uuid4().hex[:12]}"}
    settings.CHANNEL_LAYERS = layers
    return layers


@pytest.fixture
def hub_settings(settings):
    """Override some HUB settings for one test: hub_settings(AUTH_TIMEOUT=1)."""

    def override(**values):
        settings.HUB = {**settings.HUB, **values}
        return settings.HUB

    return override


@pytest.fixture
async def locked_database(monkeypatch):
    """Let a test hold a write lock on the database from another connection.

    Models a database that is up but cannot take writes (a stuck transaction, a long migration).
    While the lock is held the hub's connections wait only briefly for it and then fail the way
    they would in production (SQLite "database is locked", PostgreSQL lock timeout).
    """
    settings_dict = connection.settings_dict
    if connection.vendor == "sqlite":
        short_wait = {"timeout": 0.2}
        locker = sqlite3.connect(settings_dict["NAME"], isolation_level=None)
        statement = "BEGIN IMMEDIATE"
    else:
        import psycopg

        short_wait = {"options": "-c lock_timeout=200"}
        locker = psycopg.connect(
            dbname=settings_dict["NAME"],
            user=settings_dict["USER"],
            host=settings_dict["HOST"],
            port=settings_dict["PORT"] or 5432,
        )
        statement = "LOCK TABLE messaging_mailbox IN EXCLUSIVE MODE"
    monkeypatch.setitem(settings_dict, "OPTIONS", {**settings_dict["OPTIONS"], **short_wait})

    async def reconnect():
        # Consumers use one database thread and the engine its writer thread; their next query
        # opens a connection with the options in force (the short wait while locked, the
        # normal ones afterwards).
        await database_sync_to_async(lambda: connection.close())()
        await engine().close()

    class Lock:
        async def hold(self):
            await reconnect()
            locker.execute(statement)

        def release(self):
            if connection.vendor != "sqlite":
                locker.rollback()
            elif locker.in_transaction:
                locker.execute("ROLLBACK")

    lock = Lock()
    yield lock
    lock.release()
    locker.close()
    monkeypatch.undo()
    await reconnect()


class WritingSend:
    """A communicator's `send` that also writes text frames at once, as daphne's does under
    ops.lean_server (ProtocolSend.write_text): they join the frames sent the ASGI way in order."""

    def __init__(self, send):
        self.send = send

    def __call__(self, message):
        return self.send(message)

    def write_text(self, data: bytes) -> bool:
        self.send.__self__.put_nowait({"type": "websocket.send", "text": data.decode()})
        return True


async def application_writing_now(scope, receive, send):
    """The hub as daphne serves it (ops/lean_server.py): events come through an InputQueue,
    put there from outside the consumer's task, and frames can be written at once."""
    queue = InputQueue()
    feeder = asyncio.ensure_future(_feed(receive, queue))
    consumer = application(scope, queue.get, WritingSend(send))
    del scope  # nor does this coroutine keep the scope (test_ws_auth)
    try:
        await consumer
    finally:
        feeder.cancel()


async def _feed(receive, queue: InputQueue) -> None:
    while True:
        queue.put_nowait(await receive())


def communicator_for(
    credentials=None, *, headers=None, writes_now: bool = True
) -> WebsocketCommunicator:
    """A WebSocket to the agent endpoint whose server writes frames at once, as daphne does
    (`writes_now`), or only through the ASGI send."""
    if headers is None:
        headers = credentials.ws_headers if credentials is not None else []
    served = application_writing_now if writes_now else application
    return WebsocketCommunicator(served, "/ws/agent/", headers=headers)


async def connect(credentials, *, headers=None, writes_now: bool = True):
    """Open an authenticated session and return it with its welcome frame."""
    communicator = communicator_for(credentials, headers=headers, writes_now=writes_now)
    # Generous timeouts: a busy CI machine must not turn a slow answer into a failure.
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    welcome = await communicator.receive_json_from(timeout=10)
    assert welcome["type"] == "welcome", welcome
    return communicator, welcome


async def receive(communicator, timeout=5.0) -> dict:
    return await communicator.receive_json_from(timeout=timeout)


async def receive_type(communicator, frame_type: str, timeout=5.0) -> dict:
    """Return the next frame of a type, failing on any other frame in between."""
    frame = await receive(communicator, timeout)
    assert frame["type"] == frame_type, frame
    return frame


async def receive_messages(communicator, count: int, timeout=5.0) -> list[dict]:
    """Collect `count` message frames (skipping nothing else: any other frame fails the test)."""
    frames = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(frames) < count:
        frame = await receive(communicator, max(deadline - loop.time(), 0.01))
        assert frame["type"] == "message", frame
        frames.append(frame)
    return frames


async def request(communicator, frame: dict, timeout=2.0) -> dict:
    """Send a frame and return the server's next frame."""
    await communicator.send_json_to(frame)
    return await receive(communicator, timeout)


async def closed_with(communicator, timeout=2.0) -> int:
    """Wait for the server to close the socket and return the close code (frames are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        output = await communicator.receive_output(max(deadline - loop.time(), 0.01))
        if output["type"] == "websocket.close":
            return output.get("code", 1000)


async def closed_and_finished(communicator, timeout=2.0) -> int:
    """Like closed_with, then answer the close as a client does so the consumer finishes."""
    code = await closed_with(communicator, timeout)
    await communicator.disconnect(code)
    return code


def in_db(function):
    """Run an ORM callable from async test code."""
    return database_sync_to_async(function)
