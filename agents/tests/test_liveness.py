"""Liveness: connections recorded, status derived, the sweep, and sockets closed on revocation."""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from agents import live, services, tasks
from agents.models import Agent, Connection, IssuedToken

INTERVAL = 10  # seconds; silent for 3 * INTERVAL = offline


@pytest.fixture(autouse=True)
def short_heartbeat(settings):
    settings.HUB = {**settings.HUB, "HEARTBEAT_INTERVAL": INTERVAL}


@pytest.fixture
def layer():
    return get_channel_layer()


@pytest.fixture
def channel(layer):
    """A real channel on the Redis layer, standing in for one socket's consumer."""
    return async_to_sync(layer.new_channel)()


def receive(layer, channel, timeout=2.0):
    """Read one event from a channel, failing fast instead of waiting forever."""

    async def read():
        return await asyncio.wait_for(layer.receive(channel), timeout)

    return async_to_sync(read)()


def ago(seconds: float):
    return timezone.now() - timedelta(seconds=seconds)


def connect(agent, *, channel_name="test.channel", seen_ago=0.0) -> Connection:
    connection = services.connection_open(
        agent=agent, channel_name=channel_name, server="hub-1", remote_addr="203.0.113.9"
    )
    Connection.objects.filter(pk=connection.pk).update(last_seen_at=ago(seen_ago))
    Agent.objects.filter(pk=agent.pk).update(last_seen_at=ago(seen_ago))
    connection.refresh_from_db()
    return connection


def status_of(agent_id: str) -> str:
    return Agent.objects.get(agent_id=agent_id).get_status()


# --- Connections recorded -----------------------------------------------------------------------


def test_opening_a_connection_records_who_where_and_when(alice):
    before = timezone.now()
    connection = services.connection_open(
        agent=alice.agent,
        channel_name="specific.abc",
        server="hub-7",
        remote_addr="198.51.100.4:52311",
        user_agent="agent-sdk/1.2",
    )
    connection.refresh_from_db()
    assert connection.agent == alice.agent and connection.server == "hub-7"
    assert (
        connection.remote_addr == "198.51.100.4:52311" and connection.user_agent == "agent-sdk/1.2"
    )
    assert connection.opened_at >= before and connection.closed_at is None and connection.is_open
    alice.agent.refresh_from_db()
    assert alice.agent.last_seen_at == connection.opened_at


def test_opening_a_connection_truncates_oversized_client_details(alice):
    connection = services.connection_open(
        agent=alice.agent, channel_name="c", server="s", remote_addr="a" * 500, user_agent="u" * 999
    )
    assert len(connection.remote_addr) == 64 and len(connection.user_agent) == 300


def test_closing_a_connection_records_when_and_how(alice):
    connection = connect(alice.agent)
    services.connection_closed(connection=connection, code=1000)
    connection.refresh_from_db()
    assert connection.closed_at is not None and connection.close_code == 1000
    # A second report of the same close keeps the first.
    services.connection_closed(connection=connection, code=4401)
    connection.refresh_from_db()
    assert connection.close_code == 1000


# --- Status derived from connections and last_seen_at ------------------------------------------


@pytest.mark.parametrize(
    ("last_seen", "open_connection", "expected"),
    [
        (None, False, "offline"),
        (0, False, "online"),
        (3 * INTERVAL - 2, False, "online"),
        (3 * INTERVAL + 2, False, "offline"),
        (3600, True, "online"),
        (None, True, "online"),
    ],
)
def test_status_comes_from_open_connections_and_the_last_sign_of_life(
    alice, last_seen, open_connection, expected
):
    if open_connection:
        connect(alice.agent)
    Agent.objects.filter(pk=alice.agent.pk).update(
        last_seen_at=None if last_seen is None else ago(last_seen)
    )
    assert status_of("alice") == expected
    # The querysets discovery filters with agree with the model, and split agents in two.
    online = set(Agent.objects.online().values_list("agent_id", flat=True))
    offline = set(Agent.objects.offline().values_list("agent_id", flat=True))
    assert ("alice" in online) == (expected == "online")
    assert ("alice" in offline) == (expected == "offline")


def test_a_closed_connection_does_not_keep_an_agent_online(alice):
    connection = connect(alice.agent, seen_ago=3600)
    assert status_of("alice") == "online"
    Connection.objects.filter(pk=connection.pk).update(closed_at=ago(3600))
    assert status_of("alice") == "offline"


def test_status_follows_the_configured_heartbeat_interval(alice, settings):
    Agent.objects.filter(pk=alice.agent.pk).update(last_seen_at=ago(100))
    assert status_of("alice") == "offline"
    settings.HUB = {**settings.HUB, "HEARTBEAT_INTERVAL": 60}
    assert status_of("alice") == "online"


# --- The sweep ----------------------------------------------------------------------------------


def test_the_sweep_closes_connections_silent_for_three_intervals(alice, bob):
    stale = connect(alice.agent, channel_name="stale.1", seen_ago=3 * INTERVAL + 5)
    fresh = connect(bob.agent, channel_name="fresh.1", seen_ago=INTERVAL)
    assert services.connections_sweep() == 1
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.closed_at is not None and stale.close_code == 1001
    assert fresh.closed_at is None
    assert status_of("alice") == "offline" and status_of("bob") == "online"


def test_the_sweep_tells_the_stale_socket_to_close(alice, layer, channel):
    connect(alice.agent, channel_name=channel, seen_ago=3 * INTERVAL + 5)
    services.connections_sweep()
    assert receive(layer, channel) == {"type": "hub.close", "code": 1001}


def test_the_sweep_leaves_closed_connections_alone(alice):
    connection = connect(alice.agent, seen_ago=3600)
    services.connection_closed(connection=connection, code=1000)
    assert services.connections_sweep() == 0
    connection.refresh_from_db()
    assert connection.close_code == 1000


def test_the_sweep_closes_each_stale_connection_once(alice):
    connect(alice.agent, channel_name="a.1", seen_ago=3600)
    connect(alice.agent, channel_name="a.2", seen_ago=3600)
    assert services.connections_sweep() == 2
    assert services.connections_sweep() == 0
    assert not Connection.objects.open().exists()


def test_an_agent_with_a_recent_rest_heartbeat_stays_online_after_the_sweep(as_agent, alice):
    connect(alice.agent, seen_ago=3600)
    as_agent(alice).post("/api/v1/agents/me/heartbeat/")
    assert services.connections_sweep() == 1
    assert status_of("alice") == "online"


def test_the_celery_task_runs_the_sweep(alice):
    connect(alice.agent, seen_ago=3600)
    assert tasks.sweep_liveness() == 1
    assert not Connection.objects.open().exists()
    assert status_of("alice") == "offline"


def test_celery_beat_runs_the_sweep_every_sweep_interval(settings):
    from mcp_project.celery import app

    app.finalize()
    entries = [
        e for e in app.conf.beat_schedule.values() if e["task"] == "agents.tasks.sweep_liveness"
    ]
    assert len(entries) == 1
    assert entries[0]["schedule"] == settings.HUB["SWEEP_INTERVAL"]


def test_the_purge_task_drops_token_records_long_expired(alice):
    IssuedToken.objects.filter(agent=alice.agent, token_type="access").update(
        expires_at=ago(2 * 86400)
    )
    assert tasks.purge_expired_tokens() == 1
    assert list(IssuedToken.objects.values_list("token_type", flat=True)) == ["refresh"]


# --- Sockets closed when access ends ------------------------------------------------------------


def test_disabling_an_agent_revokes_its_tokens_and_closes_its_sockets_with_4403(
    alice, layer, channel, django_capture_on_commit_callbacks
):
    group = live.agent_group(alice.agent.pk)
    async_to_sync(layer.group_add)(group, channel)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            services.agent_disable(agent=alice.agent)
        assert receive(layer, channel) == {"type": "hub.close", "code": 4403}
    finally:
        async_to_sync(layer.group_discard)(group, channel)
    assert not IssuedToken.objects.filter(agent=alice.agent, revoked_at__isnull=True).exists()
    assert Agent.objects.get(pk=alice.agent.pk).state == Agent.State.DISABLED


def test_sockets_are_told_to_close_only_after_the_change_commits(
    alice, layer, channel, django_capture_on_commit_callbacks
):
    group = live.agent_group(alice.agent.pk)
    async_to_sync(layer.group_add)(group, channel)
    try:
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            services.agent_deregister(agent=alice.agent)
        # Nothing is sent while the transaction is open; the close is queued for the commit.
        assert len(callbacks) == 1
        callbacks[0]()
        assert receive(layer, channel) == {"type": "hub.close", "code": 4403}
    finally:
        async_to_sync(layer.group_discard)(group, channel)


def test_revoking_one_access_token_closes_only_the_sockets_it_opened(
    alice, layer, channel, django_capture_on_commit_callbacks
):
    connect(alice.agent, channel_name=channel)
    token = IssuedToken.objects.get(agent=alice.agent, token_type="access")
    with django_capture_on_commit_callbacks(execute=True):
        services.token_revoke(token=token)
    assert receive(layer, channel) == {"type": "hub.close", "code": 4401, "token_jti": token.jti}
