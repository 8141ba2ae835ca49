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
    in_db,
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


@pytest.mark.parametrize("writes_now", [True, False], ids=["written-at-once", "asgi-send"])
async def test_a_socket_that_sends_to_its_own_agent_reads_accepted_before_the_message(
    alice, writes_now
):
    a, _ = await connect(alice, writes_now=writes_now)
    for n in range(3):
        await a.send_json_to({"type": "send", "to": "alice", "payload": n, "ref": f"r{n}"})
        accepted = await receive(a)
        assert (accepted["type"], accepted["ref"]) == ("accepted", f"r{n}")
        message = await receive(a)
        assert (message["type"], message["payload"]) == ("message", n)
    await a.disconnect()


@pytest.fixture
def tasks_started(monkeypatch):
    """Which of the consumer's ways of starting a task each frame took."""
    from messaging.consumers import AgentConsumer

    started = []
    for name in ("_answer_later", "_background"):
        original = getattr(AgentConsumer, name)

        def spy(self, *args, _original=original, _name=name):
            started.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(AgentConsumer, name, spy)
    return started


@pytest.mark.parametrize("writes_now", [True, False], ids=["written-at-once", "asgi-send"])
async def test_a_socket_that_writes_at_once_answers_and_delivers_without_a_task(
    alice, bob, tasks_started, writes_now
):
    a, _ = await connect(alice, writes_now=writes_now)
    b, _ = await connect(bob, writes_now=writes_now)
    tasks_started.clear()
    for n in range(3):
        await a.send_json_to({"type": "send", "to": "bob", "payload": n, "ref": f"r{n}"})
    assert [(await receive(a))["ref"] for _ in range(3)] == ["r0", "r1", "r2"]
    assert [frame["payload"] for frame in await receive_messages(b, 3)] == [0, 1, 2]
    if writes_now:
        assert tasks_started == []
    else:
        assert sorted(set(tasks_started)) == ["_answer_later", "_background"]
    await a.disconnect()
    await b.disconnect()


async def test_a_socket_that_writes_at_once_fills_a_gap_in_its_frames_from_the_database(
    alice, bob, monkeypatch
):
    from messaging.consumers import AgentConsumer

    original = AgentConsumer.deliver_local

    def losing(self, frames):
        kept = [frame for frame in frames if frame["payload"] != "lost"]
        if kept:
            original(self, kept)

    monkeypatch.setattr(AgentConsumer, "deliver_local", losing)
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    for payload in ("lost", "after"):
        await a.send_json_to({"type": "send", "to": "bob", "payload": payload, "ref": payload})
        assert (await receive(a))["type"] == "accepted"
    frames = await receive_messages(b, 2)
    assert [(frame["seq"], frame["payload"]) for frame in frames] == [(1, "lost"), (2, "after")]
    assert await b.receive_nothing(0.2)
    await a.disconnect()
    await b.disconnect()


@pytest.fixture
def read_the_coroutine_way(monkeypatch):
    """The frames a socket read through websocket_receive rather than at once."""
    from messaging.consumers import AgentConsumer

    frames = []
    original = AgentConsumer.websocket_receive

    async def websocket_receive(self, message):
        frames.append(message.get("frame", {}).get("type", "unparsed"))
        await original(self, message)

    monkeypatch.setattr(AgentConsumer, "websocket_receive", websocket_receive)
    return frames


async def test_a_waiting_socket_reads_sends_acks_and_heartbeats_at_once(
    alice, bob, read_the_coroutine_way
):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    read_the_coroutine_way.clear()
    await a.send_json_to({"type": "send", "to": "bob", "payload": 1, "ref": "s"})
    assert (await receive(a))["type"] == "accepted"
    [message] = await receive_messages(b, 1)
    await b.send_json_to({"type": "ack", "up_to_seq": message["seq"]})
    assert (await request(b, {"type": "heartbeat", "ref": "h"}))["type"] == "heartbeat_ack"
    assert read_the_coroutine_way == []
    # Anything else is read the coroutine way, parsed once.
    assert (await request(a, {"type": "subscribe", "topic": "t", "ref": "x"}))["ref"] == "x"
    assert read_the_coroutine_way == ["subscribe"]
    await a.disconnect()
    await b.disconnect()


async def test_a_frame_read_at_once_never_overtakes_one_read_the_coroutine_way(alice):
    a, _ = await connect(alice)
    # Sent together: the publish reaches the socket while the subscribe is being stored.
    await a.send_json_to({"type": "subscribe", "topic": "jobs", "ref": "sub"})
    await a.send_json_to({"type": "publish", "topic": "jobs", "payload": 1, "ref": "pub"})
    await a.send_json_to({"type": "heartbeat", "ref": "hb"})
    answers = [await receive(a) for _ in range(4)]
    assert answers[0]["ref"] == "sub"
    by_type = {frame["type"]: frame for frame in answers[1:]}
    assert by_type["heartbeat_ack"]["ref"] == "hb"  # answered before the publish's commit
    assert by_type["accepted"]["recipients"] == 1  # the subscription was stored first
    assert by_type["message"]["payload"] == 1
    await a.disconnect()


async def test_a_frame_read_at_once_that_fails_is_answered_and_the_socket_lives_on(
    alice, bob, monkeypatch
):
    from messaging.consumers import AgentConsumer

    def failing(self, frame, **fields):
        raise RuntimeError("boom")

    monkeypatch.setattr(AgentConsumer, "_accept_now", failing)
    a, _ = await connect(alice)
    answer = await request(a, {"type": "send", "to": "bob", "payload": 1, "ref": "r"})
    assert (answer["type"], answer["code"], answer["ref"]) == ("error", "internal", "r")
    assert (await request(a, {"type": "heartbeat", "ref": "h"}))["type"] == "heartbeat_ack"
    await a.disconnect()


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


# --- What an open socket keeps ----------------------------------------------------------------


def consumer_of(agent_pk: int):
    from ops.shutdown import live_consumers

    [consumer] = [c for c in live_consumers if c._agent_pk == agent_pk]
    return consumer


async def test_an_open_session_keeps_no_model_row_yet_reads_its_agent_and_connection(alice, bob):
    from django.db import models

    from agents.models import Connection

    session, welcome = await connect(alice)
    consumer = consumer_of(alice.agent.pk)
    assert not [v for v in vars(consumer).values() if isinstance(v, models.Model)]
    agent = consumer.agent
    assert (agent.pk, agent.agent_id) == (alice.agent.pk, "alice")
    assert "name" in agent.get_deferred_fields()  # nothing else was kept
    row = await in_db(Connection.objects.get)(session_id=welcome["session_id"])
    assert consumer.connection.pk == row.pk and consumer.connection.agent_id == alice.agent.pk
    # The services the socket calls with them still work: send, subscribe, and the close.
    await session.send_json_to({"type": "subscribe", "ref": "s", "topic": "jobs"})
    assert (await receive(session))["type"] == "subscribed"
    await session.send_json_to({"type": "send", "ref": "m", "to": "bob", "payload": {"n": 1}})
    assert (await receive(session))["type"] == "accepted"
    await session.disconnect()
    row = await in_db(Connection.objects.get)(pk=row.pk)
    assert row.closed_at is not None


async def test_a_socket_that_sends_keeps_one_agent_for_its_sends(alice, bob, monkeypatch):
    from messaging import batch

    senders = []
    original = batch.write_batch

    def write_batch(sends, *args, **kwargs):
        senders.extend(send.sender for send in sends)
        return original(sends, *args, **kwargs)

    monkeypatch.setattr(batch, "write_batch", write_batch)
    session, _ = await connect(alice)
    consumer = consumer_of(alice.agent.pk)
    assert consumer._sender is None  # none until the first send
    for n in range(2):
        await session.send_json_to({"type": "send", "ref": f"m{n}", "to": "bob", "payload": n})
        assert (await receive(session))["type"] == "accepted"
    first, again = senders
    assert first is again and (first.pk, first.agent_id) == (alice.agent.pk, "alice")
    await session.disconnect()


async def test_state_every_socket_starts_with_alike_is_each_sockets_own_once_written():
    from messaging.consumers import AgentConsumer

    first, second = AgentConsumer(), AgentConsumer()
    first._refused_in_a_row += 1
    first.pushed_seq = 7
    assert (second._refused_in_a_row, second.pushed_seq) == (0, 0)
    assert (AgentConsumer._refused_in_a_row, AgentConsumer.pushed_seq) == (0, 0)

    async def nothing():
        pass

    handle = first._later(60, nothing)
    task = asyncio.ensure_future(nothing())
    first._track(task)
    assert first._timers == {handle} and len(first._tasks) == 1
    assert second._timers is None and second._tasks is None
    assert AgentConsumer._timers is None and AgentConsumer._tasks is None
    first._cancel(handle)
    second._cancel(handle)  # a socket without timers cancels nothing of another's
    assert first._timers == set()
    await task
    await asyncio.sleep(0)  # its done callbacks
    assert first._tasks == set()


class Expiring:
    def __init__(self):
        self.expired = 0

    def _token_expired(self):
        self.expired += 1


async def test_token_expiries_share_a_timer_per_instant_and_cancel_it_when_empty():
    from datetime import timedelta

    from django.utils import timezone

    from messaging.consumers import TokenExpiries

    expiries = TokenExpiries()
    soon = timezone.now() + timedelta(seconds=0.2)
    later = soon + timedelta(seconds=60)
    a, b, c, gone = Expiring(), Expiring(), Expiring(), Expiring()
    key = expiries.add(a, soon)
    assert expiries.add(b, soon) == key and expiries.add(gone, soon) == key
    other = expiries.add(c, later)
    assert len(expiries._due) == 2
    expiries.discard(gone, key)
    await asyncio.sleep(0.4)
    assert (a.expired, b.expired, gone.expired, c.expired) == (1, 1, 0, 0)
    expiries.discard(a, key)  # a socket closing after its expiry: nothing left to do
    timer = expiries._due[other][0]
    expiries.discard(c, other)
    assert timer.cancelled() and not expiries._due
    # A token already past its expiry closes its socket at once.
    expiries.add(a, timezone.now() - timedelta(seconds=5))
    await asyncio.sleep(0.05)
    assert a.expired == 2 and not expiries._due
