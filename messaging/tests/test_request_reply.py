"""Request/reply: to an agent or a capability, replies routed back, timeouts kept by the server."""

import time

import pytest

from messaging.models import Delivery, Message

from .conftest import connect, in_db, receive, receive_messages, receive_type, request

pytestmark = pytest.mark.django_db(transaction=True)


async def ask(session, ref="q", **fields):
    accepted = await request(session, {"type": "request", "ref": ref, "payload": "?", **fields})
    assert accepted["type"] == "accepted" and accepted["ref"] == ref, accepted
    return accepted


async def test_a_reply_comes_back_to_the_requester_as_a_response(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    accepted = await ask(a, to="bob", payload={"q": "score?"}, timeout=5)
    [incoming] = await receive_messages(b, 1)
    assert incoming["kind"] == "request" and incoming["from"] == "alice"
    assert incoming["message_id"] == accepted["message_id"]
    assert incoming["payload"] == {"q": "score?"}
    await b.send_json_to(
        {"type": "reply", "in_reply_to": incoming["message_id"], "payload": {"score": 7}}
    )
    response = await receive_type(a, "response")
    assert response == {
        "type": "response",
        "ref": "q",
        "in_reply_to": accepted["message_id"],
        "from": "bob",
        "payload": {"score": 7},
    }
    # Replying settles the request: it is not delivered again.
    delivery = await in_db(lambda: Delivery.objects.get(message_id=accepted["message_id"]))()
    assert delivery.status == "acked"
    reply = await in_db(lambda: Message.objects.get(kind="reply"))()
    assert str(reply.in_reply_to) == accepted["message_id"]
    await a.disconnect()
    await b.disconnect()


async def test_a_capability_request_goes_to_an_online_holder_other_than_the_requester(
    alice, bob, carol
):
    # alice and carol both have "ocr"; alice asks, so carol must answer.
    a, _ = await connect(alice)
    c, _ = await connect(carol)
    accepted = await ask(a, capability="ocr")
    [incoming] = await receive_messages(c, 1)
    assert incoming["message_id"] == accepted["message_id"] and incoming["kind"] == "request"
    await a.disconnect()
    await c.disconnect()


async def test_capability_requests_are_spread_over_the_online_holders(alice, bob, carol):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    c, _ = await connect(carol)
    for n in range(24):
        await ask(b, ref=str(n), capability="ocr")

    def holders():
        return list(
            Delivery.objects.filter(message__kind="request").values_list(
                "recipient__agent_id", flat=True
            )
        )

    chosen = await in_db(holders)()
    assert len(chosen) == 24
    # Both holders got some (all 24 to one of two has odds of 2 in 16 million).
    assert {"alice", "carol"} == set(chosen)
    for session in (a, b, c):
        await session.disconnect()


async def test_it_answers_no_responders_at_once_when_no_holder_is_online(alice, bob, carol):
    # carol has "ocr" but has never connected; alice, the other holder, is the requester.
    a, _ = await connect(alice)
    started = time.monotonic()
    answer = await request(a, {"type": "request", "capability": "ocr", "payload": 1, "ref": "q"})
    assert answer["type"] == "error" and answer["code"] == "no_responders", answer
    assert answer["ref"] == "q" and time.monotonic() - started < 1
    assert await in_db(Message.objects.count)() == 0
    await a.disconnect()


async def test_a_holder_that_went_offline_is_not_chosen(alice, bob, carol):
    c, _ = await connect(carol)
    await c.disconnect()
    b, _ = await connect(bob)
    answer = await request(b, {"type": "request", "capability": "ocr", "payload": 1, "ref": "q"})
    assert answer["code"] == "no_responders"
    await b.disconnect()


async def test_it_answers_no_responders_for_an_unknown_capability(alice):
    a, _ = await connect(alice)
    answer = await request(a, {"type": "request", "capability": "teleport", "payload": 1})
    assert answer["code"] == "no_responders"
    await a.disconnect()


async def test_a_request_to_an_unknown_agent_is_refused(alice):
    a, _ = await connect(alice)
    answer = await request(a, {"type": "request", "to": "nobody", "payload": 1, "ref": "q"})
    assert answer["code"] == "unknown_recipient" and answer["ref"] == "q"
    await a.disconnect()


async def test_the_server_times_out_an_unanswered_request(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    accepted = await ask(a, to="bob", timeout=0.3)
    [incoming] = await receive_messages(b, 1)
    started = time.monotonic()
    error = await receive(a, timeout=2)
    assert error["type"] == "error" and error["code"] == "timeout"
    assert error["ref"] == "q" and error["message_id"] == accepted["message_id"]
    assert time.monotonic() - started < 1
    # A late reply is stored but never reaches the requester.
    await b.send_json_to({"type": "reply", "in_reply_to": incoming["message_id"], "payload": 1})
    assert await a.receive_nothing(0.3)
    await a.disconnect()
    await b.disconnect()


async def test_a_timed_out_request_is_not_delivered_later(alice, bob):
    a, _ = await connect(alice)
    await ask(a, to="bob", timeout=0.2)
    assert (await receive(a, timeout=2))["code"] == "timeout"
    b, welcome = await connect(bob)
    assert welcome["pending"] == 0
    assert await b.receive_nothing(0.2)
    await a.disconnect()
    await b.disconnect()


async def test_the_request_timeout_is_capped_by_the_server(alice, bob, hub_settings):
    hub_settings(MAX_REQUEST_TIMEOUT=1)
    a, _ = await connect(alice)
    await ask(a, to="bob", timeout=3600)
    error = await receive(a, timeout=3)
    assert error["code"] == "timeout"
    await a.disconnect()


async def test_a_reply_to_a_request_you_did_not_receive_is_refused(alice, bob, carol):
    a, _ = await connect(alice)
    c, _ = await connect(carol)
    accepted = await ask(a, to="bob", timeout=5)
    answer = await request(
        c, {"type": "reply", "in_reply_to": accepted["message_id"], "payload": 1, "ref": "r"}
    )
    assert answer["type"] == "error" and answer["code"] == "invalid_frame", answer
    assert answer["field"] == "in_reply_to" and answer["ref"] == "r"
    assert await a.receive_nothing(0.2)
    assert (await request(c, {"type": "heartbeat", "ref": "h"}))["type"] == "heartbeat_ack"
    await a.disconnect()
    await c.disconnect()


async def test_a_reply_to_a_plain_message_is_refused(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    sent = await request(a, {"type": "send", "to": "bob", "payload": 1})
    await receive_messages(b, 1)
    answer = await request(
        b, {"type": "reply", "in_reply_to": sent["message_id"], "payload": 1, "ref": "r"}
    )
    assert answer["code"] == "invalid_frame" and answer["field"] == "in_reply_to"
    await a.disconnect()
    await b.disconnect()
