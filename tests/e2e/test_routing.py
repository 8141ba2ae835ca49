"""Messages between real agents on real daphne processes that share one Redis."""

import asyncio

import pytest

from .harness import AgentSocket

pytestmark = pytest.mark.e2e


async def test_it_routes_a_direct_message_within_one_server(hub):
    alice, bob = hub.register(), hub.register()
    async with (
        await AgentSocket.connect(hub.ws_url(0), alice.access) as a,
        await AgentSocket.connect(hub.ws_url(0), bob.access) as b,
    ):
        accepted = await a.send_to(bob.agent_id, {"text": "hello"}, client_id="c-1")
        assert accepted["type"] == "accepted"
        assert accepted["recipients"] == 1 and accepted["duplicate"] is False
        assert accepted["status"] == "delivered"

        [message] = await b.wait_messages(1)
        assert message["message_id"] == accepted["message_id"]
        assert message["from"] == alice.agent_id
        assert message["kind"] == "direct"
        assert message["payload"] == {"text": "hello"}
        assert message["seq"] == 1 and message["redelivered"] is False


async def test_it_routes_between_agents_connected_to_different_server_processes(hub):
    alice, bob = hub.register(), hub.register()
    async with (
        await AgentSocket.connect(hub.ws_url(0), alice.access) as a,
        await AgentSocket.connect(hub.ws_url(1), bob.access) as b,
    ):
        for n in range(5):
            await a.send_to(bob.agent_id, {"n": n})
            await b.send_to(alice.agent_id, {"n": n})

        to_bob = await b.wait_messages(5)
        to_alice = await a.wait_messages(5)
        assert [m["payload"]["n"] for m in to_bob] == [0, 1, 2, 3, 4]
        assert [m["seq"] for m in to_bob] == [1, 2, 3, 4, 5]
        assert {m["from"] for m in to_bob} == {alice.agent_id}
        assert [m["payload"]["n"] for m in to_alice] == [0, 1, 2, 3, 4]
        assert {m["from"] for m in to_alice} == {bob.agent_id}


async def test_it_broadcasts_to_every_other_active_agent_on_both_servers(hub):
    sender = hub.register()
    listeners = [hub.register() for _ in range(3)]
    active = (
        await asyncio.to_thread(hub.http, "GET", "/api/v1/agents/?limit=1", token=sender.access)
    ).body

    sockets = [
        await AgentSocket.connect(hub.ws_url(i % 2), creds.access)
        for i, creds in enumerate(listeners)
    ]
    try:
        async with await AgentSocket.connect(hub.ws_url(1), sender.access) as s:
            accepted = await s.call({"type": "broadcast", "payload": {"note": "to all"}})
            assert accepted["type"] == "accepted"
            # Everyone active but the sender, including agents of other tests that are offline.
            assert accepted["recipients"] == active["count"] - 1

            for sock in sockets:
                [message] = await sock.wait_messages(1)
                assert message["message_id"] == accepted["message_id"]
                assert message["kind"] == "broadcast"
                assert message["from"] == sender.agent_id
            # The sender is not among the recipients of its own broadcast.
            assert s.messages == []
    finally:
        for sock in sockets:
            await sock.close()


async def test_it_routes_a_topic_publication_to_subscribers_on_the_other_server(hub):
    publisher, subscriber, bystander = hub.register(), hub.register(), hub.register()
    async with (
        await AgentSocket.connect(hub.ws_url(0), publisher.access) as p,
        await AgentSocket.connect(hub.ws_url(1), subscriber.access) as s,
        await AgentSocket.connect(hub.ws_url(1), bystander.access) as b,
    ):
        topic = f"e2e.{subscriber.agent_id}"
        subscribed = await s.call({"type": "subscribe", "topic": topic})
        assert subscribed == {"type": "subscribed", "ref": subscribed["ref"], "topic": topic}

        accepted = await p.call({"type": "publish", "topic": topic, "payload": {"x": 1}})
        assert accepted["recipients"] == 1

        [message] = await s.wait_messages(1)
        assert message["kind"] == "topic" and message["topic"] == topic
        # A direct message sent after the publication arrives, so the publication would have too.
        await p.send_to(bystander.agent_id, "after")
        [after] = await b.wait_messages(1)
        assert after["payload"] == "after"
        assert b.messages == [after]
