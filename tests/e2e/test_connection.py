"""Authentication, bad frames and deregistration as a real client sees them over the network."""

import asyncio
import json
import signal
import time

import pytest

from .conftest import E2E_ORIGIN
from .harness import AgentSocket

pytestmark = pytest.mark.e2e


async def test_it_closes_with_4401_on_a_bad_bearer_token(hub):
    sock = await AgentSocket.open(hub.ws_url(0), token="not-a-jwt")
    error = await sock.next_event()
    assert error["type"] == "error" and error["code"] == "not_authenticated"
    assert await sock.wait_closed() == 4401
    assert sock.welcome is None


async def test_it_closes_with_4401_on_a_bad_token_in_the_auth_frame(hub):
    sock = await AgentSocket.open(hub.ws_url(1), origin=E2E_ORIGIN)
    error = await sock.call({"type": "auth", "token": "still-not-a-jwt"})
    assert error["type"] == "error" and error["code"] == "not_authenticated"
    assert await sock.wait_closed() == 4401


async def test_it_closes_with_4408_when_no_credentials_arrive_in_time(hub):
    # The hub runs with HUB_AUTH_TIMEOUT=1 (see conftest.BASE_ENV).
    started = time.monotonic()
    sock = await AgentSocket.open(hub.ws_url(0), origin=E2E_ORIGIN)
    assert await sock.wait_closed(timeout=10) == 4408
    assert 0.9 <= time.monotonic() - started < 5


async def test_it_accepts_a_first_frame_auth_from_an_allowed_origin(hub):
    agent = hub.register()
    sock = await AgentSocket.open(hub.ws_url(1), origin=E2E_ORIGIN)
    async with sock:
        await sock.send_frame({"type": "auth", "token": agent.access})
        welcome = await sock.next_event()
        assert welcome["type"] == "welcome" and welcome["agent_id"] == agent.agent_id


async def test_it_answers_bad_frames_with_errors_and_keeps_the_connection_usable(hub):
    alice, bob = hub.register(), hub.register()
    async with (
        await AgentSocket.connect(hub.ws_url(0), alice.access) as a,
        await AgentSocket.connect(hub.ws_url(1), bob.access) as b,
    ):
        await a.send_raw("{not json")
        assert (await a.next_event())["code"] == "invalid_json"

        await a.send_raw(json.dumps(["a", "list"]))
        assert (await a.next_event())["type"] == "error"

        unknown = await a.call({"type": "teleport"})
        assert unknown["type"] == "error" and unknown["code"] == "unknown_type"

        missing = await a.call({"type": "send", "payload": {}})
        assert missing["code"] == "invalid_frame" and "to" in missing["detail"]

        nobody = await a.call({"type": "send", "to": "nobody-here", "payload": {}})
        assert nobody["code"] == "unknown_recipient"

        too_big = await a.call({"type": "send", "to": bob.agent_id, "payload": "x" * 300_000})
        assert too_big["code"] == "payload_too_large"

        ack_garbage = await a.call({"type": "ack", "message_ids": ["not-a-uuid"]})
        assert ack_garbage["type"] == "error"

        # Still connected and working, both ways.
        assert (await a.call({"type": "heartbeat"}))["type"] == "heartbeat_ack"
        accepted = await a.send_to(bob.agent_id, {"after": "errors"})
        assert accepted["type"] == "accepted"
        [message] = await b.wait_messages(1)
        assert message["payload"] == {"after": "errors"}
        assert not a.closed.is_set()


async def test_deregistering_over_rest_on_one_server_closes_the_socket_on_the_other_with_4403(hub):
    agent = hub.register()
    sock = await AgentSocket.connect(hub.ws_url(1), agent.access)
    started = time.monotonic()
    answer = await asyncio.to_thread(
        hub.http, "DELETE", "/api/v1/agents/me/", server=0, token=agent.access
    )
    assert answer.status == 204

    assert await sock.wait_closed(timeout=5) == 4403
    assert time.monotonic() - started < 5

    again = await asyncio.to_thread(
        hub.http, "GET", "/api/v1/agents/me/", server=1, token=agent.access
    )
    assert again.status == 401
    rejected = await AgentSocket.open(hub.ws_url(0), token=agent.access)
    assert await rejected.wait_closed() in (4401, 4403)


async def test_a_server_shutting_down_closes_its_sockets_with_1012_at_once(hub):
    agent = hub.register()
    sock = await AgentSocket.connect(hub.ws_url(1), agent.access)
    try:
        hub.servers[1].signal(signal.SIGTERM)
        # At once, not at the end of the shutdown grace period (10 s): agents move elsewhere.
        assert await sock.wait_closed(timeout=5) == 1012
        async with await AgentSocket.connect(hub.ws_url(0), agent.access) as elsewhere:
            assert elsewhere.welcome["agent_id"] == agent.agent_id
    finally:
        await asyncio.to_thread(hub.restart_server, 1)
