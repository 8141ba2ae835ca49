"""Helpers for the context store tests: REST calls, time travel by expiry, WebSocket sessions."""

import asyncio
import uuid
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.utils import timezone

from contexts.models import ContextEntry, ContextTag
from mcp_project.asgi import application

URL = "/api/v1/contexts/"


def detail_url(context_id) -> str:
    return f"{URL}{context_id}/"


@pytest.fixture(autouse=True)
def isolated_channel_layer(settings):
    """Give each test its own key prefix in Redis, so no group leaks between tests."""
    layers = {alias: {**config} for alias, config in settings.CHANNEL_LAYERS.items()}
    default = layers["default"]
    if "CONFIG" in default:
        default["CONFIG"] = {**default["CONFIG"], "prefix": f"test-{uuid.uuid4().hex[:12]}"}
    settings.CHANNEL_LAYERS = layers
    return layers


@pytest.fixture
def hub_settings(settings):
    """Override some HUB settings for one test: hub_settings(CONTEXT_HISTORY=3)."""

    def override(**values):
        settings.HUB = {**settings.HUB, **values}
        return settings.HUB

    return override


@pytest.fixture
def share(as_agent):
    """POST an entry as an agent and return the response (201 expected unless told)."""

    def post(credentials, expect=201, headers=None, **fields):
        body = {"context_type": "task_result", "payload": {"ok": True}, **fields}
        response = as_agent(credentials).post(URL, body, format="json", headers=headers)
        assert response.status_code == expect, response.json()
        return response

    return post


def expire(context_id, *, seconds_ago: int = 1) -> None:
    """Move an entry's expiry into the past, as if its ttl had run out (its tag rows' too)."""
    moment = timezone.now() - timedelta(seconds=seconds_ago)
    ContextEntry.objects.filter(pk=context_id).update(expires_at=moment)
    ContextTag.objects.filter(entry_id=context_id).update(expires_at=moment)


def if_match(version) -> dict:
    return {"If-Match": f'"{version}"'}


# --- WebSocket ---------------------------------------------------------------------------------


async def connect(credentials):
    """Open an authenticated agent session and return it after its welcome frame."""
    communicator = WebsocketCommunicator(application, "/ws/agent/", headers=credentials.ws_headers)
    connected, _ = await communicator.connect()
    assert connected
    welcome = await communicator.receive_json_from(timeout=5)
    assert welcome["type"] == "welcome", welcome
    return communicator


async def request(communicator, frame: dict, timeout=5.0) -> dict:
    await communicator.send_json_to(frame)
    return await communicator.receive_json_from(timeout=timeout)


async def watch(communicator, **filters) -> str:
    answer = await request(communicator, {"type": "watch", "ref": "w", **filters})
    assert answer["type"] == "watching", answer
    return answer["watch_id"]


async def context_frames(communicator, count: int, timeout=5.0) -> list[dict]:
    """Collect `count` context frames; any other frame fails the test."""
    frames = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(frames) < count:
        frame = await communicator.receive_json_from(timeout=max(deadline - loop.time(), 0.01))
        assert frame["type"] == "context", frame
        frames.append(frame)
    return frames


def in_db(function):
    return database_sync_to_async(function)


@pytest.fixture
async def release_db_connections():
    """Close the connection async tests opened in the ORM's worker thread.

    Left open, it keeps PostgreSQL from dropping the test database at the end of the run.
    """
    yield
    await database_sync_to_async(connections.close_all)()
