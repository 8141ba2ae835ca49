"""The reference hub speaks the hub's frames closely enough for one load client to drive both."""

import asyncio

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from bench import client
from bench.reference_hub import ReferenceHub


@pytest.fixture
async def reference():
    hub = ReferenceHub(
        [
            {"agent_id": "a1", "capabilities": ["ocr", "sum"]},
            {"agent_id": "a2", "capabilities": ["ocr"]},
        ]
    )
    async with serve(hub.handle, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield hub, {"kind": "reference", "ws_url": f"ws://127.0.0.1:{port}/"}


async def receive(ws) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), 5))


async def test_it_routes_a_direct_message_and_answers_accepted(reference):
    _, target = reference
    alice = await client.open_agent(target, {"agent_id": "a1"})
    bob = await client.open_agent(target, {"agent_id": "a2"})
    await alice.send(
        orjson.dumps({"type": "send", "to": "a2", "payload": {"n": 1}, "ref": "r1"}), text=True
    )
    message = await receive(bob)
    accepted = await receive(alice)
    assert message["type"] == "message" and message["from"] == "a1" and message["seq"] == 1
    assert message["payload"] == {"n": 1}
    assert accepted == {**accepted, "type": "accepted", "ref": "r1", "recipients": 1}
    await alice.close()
    await bob.close()


async def test_it_names_an_agent_from_a_hello_frame(reference):
    _, target = reference
    async with connect(target["ws_url"], compression=None, proxy=None) as ws:
        await ws.send(orjson.dumps({"type": "hello", "agent_id": "a9"}), text=True)
        welcome = await receive(ws)
    assert welcome["type"] == "welcome" and welcome["agent_id"] == "a9"


async def test_it_answers_an_unknown_recipient_with_an_error_and_keeps_the_socket(reference):
    _, target = reference
    alice = await client.open_agent(target, {"agent_id": "a1"})
    await alice.send(
        orjson.dumps({"type": "send", "to": "nobody", "payload": 1, "ref": "r2"}), text=True
    )
    error = await receive(alice)
    await alice.send(b"not json", text=True)
    invalid = await receive(alice)
    await alice.send(orjson.dumps({"type": "heartbeat", "ref": "h"}), text=True)
    beat = await receive(alice)
    assert (error["code"], error["ref"]) == ("unknown_recipient", "r2")
    assert invalid["code"] == "invalid_json"
    assert beat["type"] == "heartbeat_ack"
    await alice.close()


async def test_it_publishes_to_subscribers_only(reference):
    _, target = reference
    alice = await client.open_agent(target, {"agent_id": "a1"})
    bob = await client.open_agent(target, {"agent_id": "a2"})
    carol = await client.open_agent(target, {"agent_id": "a3"})
    await bob.send(orjson.dumps({"type": "subscribe", "topic": "t", "ref": "s"}), text=True)
    assert (await receive(bob))["type"] == "subscribed"
    await alice.send(
        orjson.dumps({"type": "publish", "topic": "t", "payload": 2, "ref": "p"}), text=True
    )
    assert (await receive(bob))["topic"] == "t"
    assert (await receive(alice))["recipients"] == 1
    await alice.send(orjson.dumps({"type": "broadcast", "payload": 3, "ref": "b"}), text=True)
    assert (await receive(carol))["kind"] == "broadcast"
    assert (await receive(bob))["kind"] == "broadcast"
    assert (await receive(alice))["recipients"] == 2
    for ws in (alice, bob, carol):
        await ws.close()


def test_discovery_returns_agents_holding_every_capability_asked_for():
    hub = ReferenceHub(
        [
            {"agent_id": "a1", "capabilities": ["ocr", "sum"]},
            {"agent_id": "a2", "capabilities": ["ocr"]},
            {"agent_id": "a3", "capabilities": ["sum"]},
        ]
    )
    status, body = hub.http_route("GET", "/api/v1/agents/?capability=ocr&capability=sum")
    page = orjson.loads(body)
    assert status == 200
    assert page["count"] == 1 and [a["agent_id"] for a in page["results"]] == ["a1"]
    status, body = hub.http_route("GET", "/api/v1/agents/?capability=ocr&limit=1&offset=1")
    assert [a["agent_id"] for a in orjson.loads(body)["results"]] == ["a2"]
    assert hub.http_route("GET", "/api/v1/agents/?limit=x")[0] == 400
    assert hub.http_route("GET", "/nowhere")[0] == 404
