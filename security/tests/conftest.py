"""Helpers of the security tests: policies, and WebSocket sessions against the real Redis layer."""

import uuid

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from mcp_project.asgi import application
from security.models import AccessPolicy, PolicySettings
from security.services import policies

TIMEOUT = 5


@pytest.fixture(autouse=True)
def fresh_policy_cache():
    """Policies are cached per process for a moment; no test may see another's."""
    policies.invalidate()
    yield
    policies.invalidate()


@pytest.fixture(autouse=True)
def isolated_channel_layer(settings):
    """Give each test its own key prefix in Redis, so no group or channel leaks between tests."""
    layers = {alias: {**config} for alias, config in settings.CHANNEL_LAYERS.items()}
    default = layers["default"]
    if "CONFIG" in default:
        default["CONFIG"] = {**default["CONFIG"], "prefix": f"test-{uuid.uuid4().hex[:12]}"}
    settings.CHANNEL_LAYERS = layers


@pytest.fixture
def deny():
    """Add a deny policy: deny("alice", "send", "bob"); subject None means every agent."""

    def add(subject: str | None, action: str, target: str = "*") -> AccessPolicy:
        rule = AccessPolicy.objects.create(
            name=f"deny {subject or 'all'} {action} {target}",
            effect=AccessPolicy.Effect.DENY,
            subject_kind=AccessPolicy.SubjectKind.AGENT
            if subject
            else AccessPolicy.SubjectKind.ALL,
            subject=subject or "",
            action=action,
            target=target,
        )
        policies.invalidate()
        return rule

    return add


@pytest.fixture
def default_deny():
    def switch():
        PolicySettings.objects.update_or_create(pk=1, defaults={"default_effect": "deny"})
        policies.invalidate()

    return switch


@pytest.fixture
def operator_client(client, operator):
    """A Django test client logged in to the admin as the operator (a superuser)."""
    client.force_login(operator)
    return client


def in_db(function):
    return database_sync_to_async(function)


async def connect(credentials):
    """Open an authenticated session and return it after its welcome frame."""
    communicator = WebsocketCommunicator(application, "/ws/agent/", headers=credentials.ws_headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    welcome = await communicator.receive_json_from(TIMEOUT)
    assert welcome["type"] == "welcome", welcome
    return communicator


async def request(communicator, frame: dict) -> dict:
    await communicator.send_json_to(frame)
    return await communicator.receive_json_from(TIMEOUT)
