"""The agent consumer: routing, bad input answered without losing the socket, hub events."""

import asyncio
import logging

import pytest
from channels.layers import get_channel_layer

from agents.live import agent_group

from .conftest import (
    closed_and_finished,
    communicator_for,
    connect,
    receive,
    receive_messages,
    request,
)

pytestmark = pytest.mark.django_db(transaction=True)


async def test_it_routes_a_direct_message_between_two_agents(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await a.send_json_to({"type": "send", "to": "bob", "payload": {"n": 1}, "ref": "r1"})
    accepted = await a.receive_json_from()
    assert accepted["type"] == "accepted" and accepted["ref"] == "r1"
    message = await b.receive_json_from()
    assert message["from"] == "alice" and message["payload"] == {"n": 1} and message["seq"] == 1
    await a.disconnect()
    await b.disconnect()


async def test_it_answers_a_heartbeat(alice):
    a, _ = await connect(alice)
    ack = await request(a, {"type": "heartbeat", "ref": "h1"})
    assert ack["type"] == "heartbeat_ack" and ack["ref"] == "h1"
    assert ack["server_time"].endswith("Z")
    await a.disconnect()


async def still_usable(session):
    ack = await request(session, {"type": "heartbeat", "ref": "alive"})
    assert ack == {**ack, "type": "heartbeat_ack", "ref": "alive"}


MALFORMED_TEXT = [
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_frame", None),
    ('"send"', "invalid_frame", None),
    ("{}", "invalid_frame", None),
    ('{"type": 5}', "invalid_frame", None),
    ('{"type": "teleport", "ref": "r"}', "unknown_type", "r"),
    ('{"type": "send", "payload": 1, "ref": "r"}', "invalid_frame", "r"),
    ('{"type": "send", "to": "bob", "ref": "r"}', "invalid_frame", "r"),
    ('{"type": "send", "to": "Not An Id", "payload": 1, "ref": "r"}', "invalid_frame", "r"),
    ('{"type": "send", "to": "bob", "payload": 1, "ttl": -1, "ref": "r"}', "invalid_frame", "r"),
    ('{"type": "send", "to": "bob", "payload": 1, "id": 5, "ref": "r"}', "invalid_frame", "r"),
    ('{"type": "request", "payload": 1, "ref": "r"}', "invalid_frame", "r"),
    ('{"type": "request", "to": "bob", "capability": "ocr", "payload": 1}', "invalid_frame", None),
    ('{"type": "reply", "in_reply_to": "nope", "payload": 1, "ref": "r"}', "invalid_frame", "r"),
    ('{"type": "ack", "ref": "r"}', "invalid_frame", "r"),
    ('{"type": "ack", "message_ids": ["x"], "ref": "r"}', "invalid_frame", "r"),
    ('{"type": "ack", "up_to_seq": "3", "ref": "r"}', "invalid_frame", "r"),
    ('{"type": "heartbeat", "ref": 12}', "invalid_frame", None),
    ('{"type": "send", "to": "nobody", "payload": 1, "ref": "r"}', "unknown_recipient", "r"),
]


async def test_every_malformed_frame_gets_an_error_and_the_socket_stays_usable(alice, bob):
    a, _ = await connect(alice)
    for raw, code, ref in MALFORMED_TEXT:
        await a.send_to(text_data=raw)
        error = await receive(a)
        assert error["type"] == "error" and error["code"] == code, (raw, error)
        assert error.get("ref") == ref and error["detail"], (raw, error)
        await still_usable(a)
    await a.disconnect()


async def test_a_malformed_binary_frame_gets_an_error_and_the_socket_stays_usable(alice):
    a, _ = await connect(alice)
    for raw in (b"\xff\xfe\x00garbage", b'{"type": "send"', b"\x00" * 64, "{}".encode("utf-16")):
        await a.send_to(bytes_data=raw)
        error = await receive(a)
        assert error["type"] == "error", (raw, error)
        assert error["code"] in ("invalid_json", "invalid_frame"), (raw, error)
        await still_usable(a)
    await a.disconnect()


async def test_a_json_binary_frame_is_read_like_a_text_frame(alice, bob):
    a, _ = await connect(alice)
    await a.send_to(bytes_data=b'{"type": "send", "to": "bob", "payload": 1, "ref": "bin"}')
    accepted = await receive(a)
    assert accepted["type"] == "accepted" and accepted["ref"] == "bin"
    await a.disconnect()


async def test_a_frame_over_the_size_limit_is_refused_and_the_socket_stays_usable(
    alice, bob, hub_settings
):
    hub_settings(MAX_FRAME_BYTES=2048, MAX_PAYLOAD_BYTES=1024)
    a, _ = await connect(alice)
    big_frame = await request(a, {"type": "send", "to": "bob", "payload": "x" * 4000})
    assert big_frame["code"] == "payload_too_large"
    big_payload = await request(a, {"type": "send", "to": "bob", "payload": "x" * 1500, "ref": "p"})
    assert big_payload["code"] == "payload_too_large" and big_payload["ref"] == "p"
    await still_usable(a)
    await a.disconnect()


async def test_a_null_payload_is_a_payload(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    accepted = await request(a, {"type": "send", "to": "bob", "payload": None, "ref": "n"})
    assert accepted["type"] == "accepted", accepted
    [frame] = await receive_messages(b, 1)
    assert frame["payload"] is None
    await a.disconnect()
    await b.disconnect()


async def test_a_failing_hub_event_is_logged_and_the_socket_lives_on(alice, bob, caplog):
    a, _ = await connect(alice)
    layer = get_channel_layer()
    group = agent_group(alice.agent.pk)
    with caplog.at_level(logging.ERROR, logger="messaging.consumers"):
        await layer.group_send(group, {"type": "hub.deliver"})  # no frames: the handler raises
        await layer.group_send(group, {"type": "hub.no_such_event"})  # no handler at all
        await layer.group_send(group, {"type": "hub.replay", "delivered_before": "soon"})
        # Events and frames arrive on different queues: wait until all three were handled.
        for _ in range(100):
            if caplog.text.count("channel layer event failed") == 3:
                break
            await asyncio.sleep(0.02)
        await still_usable(a)
    assert caplog.text.count("channel layer event failed") == 3
    # Deliveries still work after the failures.
    b, _ = await connect(bob)
    await request(b, {"type": "send", "to": "alice", "payload": "still here"})
    [frame] = await receive_messages(a, 1)
    assert frame["payload"] == "still here"
    await a.disconnect()
    await b.disconnect()


async def test_it_closes_with_1013_when_the_database_cannot_open_a_session(alice, locked_database):
    await locked_database.hold()
    communicator = communicator_for(alice)
    assert (await communicator.connect(timeout=5))[0]
    error = await receive(communicator, timeout=5)
    locked_database.release()
    assert error["type"] == "error" and error["code"] == "unavailable", error
    assert await closed_and_finished(communicator) == 1013
    # Once the database is back the agent connects normally.
    a, _ = await connect(alice)
    await a.disconnect()
