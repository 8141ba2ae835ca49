"""Topics over the WebSocket: subscribe, unsubscribe, publish, durability and name checks."""

import pytest

from messaging.models import Subscription

from .conftest import connect, in_db, receive_messages, request

pytestmark = pytest.mark.django_db(transaction=True)


async def subscribe(session, topic, ref="s"):
    answer = await request(session, {"type": "subscribe", "topic": topic, "ref": ref})
    assert answer == {"type": "subscribed", "ref": ref, "topic": topic}


async def test_a_subscriber_receives_what_is_published_to_its_topic(alice, bob, carol):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    c, _ = await connect(carol)
    await subscribe(b, "jobs.ocr")
    accepted = await request(a, {"type": "publish", "topic": "jobs.ocr", "payload": 1, "ref": "p"})
    assert accepted["type"] == "accepted" and accepted["ref"] == "p"
    assert accepted["recipients"] == 1 and accepted["status"] == "delivered"
    [frame] = await receive_messages(b, 1)
    assert frame["kind"] == "topic" and frame["topic"] == "jobs.ocr"
    assert frame["from"] == "alice" and frame["message_id"] == accepted["message_id"]
    # Neither a non-subscriber nor a subscriber of another topic hears it.
    assert await c.receive_nothing(0.2)
    for session in (a, b, c):
        await session.disconnect()


async def test_topics_are_matched_exactly(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await subscribe(b, "jobs")
    accepted = await request(a, {"type": "publish", "topic": "jobs.ocr", "payload": 1})
    assert accepted["recipients"] == 0
    assert await b.receive_nothing(0.2)
    await a.disconnect()
    await b.disconnect()


async def test_an_unsubscribed_agent_stops_receiving(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await subscribe(b, "news")
    answer = await request(b, {"type": "unsubscribe", "topic": "news", "ref": "u"})
    assert answer == {"type": "unsubscribed", "ref": "u", "topic": "news"}
    accepted = await request(a, {"type": "publish", "topic": "news", "payload": 1})
    assert accepted["recipients"] == 0
    assert await b.receive_nothing(0.2)
    await a.disconnect()
    await b.disconnect()


async def test_subscribing_twice_and_unsubscribing_an_unknown_topic_are_harmless(bob):
    b, _ = await connect(bob)
    await subscribe(b, "news", ref="1")
    await subscribe(b, "news", ref="2")
    assert await in_db(Subscription.objects.filter(topic="news").count)() == 1
    answer = await request(b, {"type": "unsubscribe", "topic": "never", "ref": "3"})
    assert answer["type"] == "unsubscribed"
    await b.disconnect()


async def test_subscriptions_survive_a_reconnect(alice, bob):
    b, _ = await connect(bob)
    await subscribe(b, "alerts")
    await b.disconnect()
    a, _ = await connect(alice)
    # Published while bob is away: kept for him.
    await request(a, {"type": "publish", "topic": "alerts", "payload": "offline"})
    b, welcome = await connect(bob)
    assert welcome["pending"] == 1
    [kept] = await receive_messages(b, 1)
    assert kept["payload"] == "offline"
    # And still subscribed for live messages, without subscribing again.
    await request(a, {"type": "publish", "topic": "alerts", "payload": "online"})
    [live] = await receive_messages(b, 1)
    assert live["payload"] == "online" and live["seq"] == kept["seq"] + 1
    await a.disconnect()
    await b.disconnect()


async def test_a_publisher_subscribed_to_its_topic_gets_its_own_message(alice):
    a, _ = await connect(alice)
    await subscribe(a, "echo")
    accepted = await request(a, {"type": "publish", "topic": "echo", "payload": 1})
    assert accepted["type"] == "accepted" and accepted["recipients"] == 1
    [frame] = await receive_messages(a, 1)
    assert frame["message_id"] == accepted["message_id"]
    await a.disconnect()


INVALID_TOPICS = ["", "with space", "x" * 101, "ümlaut", "a/b", 7, None]


@pytest.mark.parametrize("frame_type", ["subscribe", "unsubscribe", "publish"])
async def test_it_refuses_invalid_topic_names_and_stays_usable(bob, frame_type):
    b, _ = await connect(bob)
    for topic in INVALID_TOPICS:
        frame = {"type": frame_type, "ref": "bad", "payload": 1}
        if topic is not None:
            frame["topic"] = topic
        answer = await request(b, frame)
        assert answer["type"] == "error" and answer["code"] == "invalid_frame", (topic, answer)
        assert answer["field"] == "topic" and answer["detail"].startswith("topic"), answer
        assert answer["ref"] == "bad"
    await subscribe(b, "fine")
    assert await in_db(Subscription.objects.count)() == 1
    await b.disconnect()


async def test_a_100_character_topic_is_valid(bob):
    b, _ = await connect(bob)
    await subscribe(b, "t" * 100)
    await b.disconnect()
