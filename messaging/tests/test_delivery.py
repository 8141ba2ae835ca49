"""Store and forward, acknowledgement, redelivery, dead letters, expiry and slow readers."""

import asyncio
import logging
import threading
import time
from datetime import timedelta

import pytest
from django.db import connections
from django.db.models import F

from agents import services as agent_services
from messaging import consumers, live, services, tasks
from messaging.models import DeadLetter, Delivery, Message

from .conftest import connect, in_db, receive, receive_messages, receive_type, request

pytestmark = pytest.mark.django_db(transaction=True)


def send(sender, to="bob", payload=None, **options):
    return in_db(services.message_send)(
        sender=sender.agent, kind="direct", to=to, payload=payload, **options
    )


async def eventually(check, timeout=3.0):
    """Poll a database condition until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        if await in_db(check)():
            return
        assert time.monotonic() < deadline, "condition did not hold in time"
        await asyncio.sleep(0.02)


def statuses(recipient):
    return list(
        Delivery.objects.filter(recipient=recipient.agent)
        .order_by("seq")
        .values_list("status", flat=True)
    )


# --- Store and forward --------------------------------------------------------------------------


async def test_it_keeps_messages_for_an_offline_agent_and_sends_them_in_order_on_connect(
    alice, bob
):
    for n in range(3):
        await send(alice, payload={"n": n})
    b, welcome = await connect(bob)
    assert welcome["pending"] == 3
    frames = await receive_messages(b, 3)
    assert [f["seq"] for f in frames] == [1, 2, 3]
    assert [f["payload"] for f in frames] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(f["from"] == "alice" and f["kind"] == "direct" for f in frames)
    assert all(f["redelivered"] is False and f["attempt"] == 1 for f in frames)
    assert await b.receive_nothing(0.2)
    await b.disconnect()


async def test_it_sends_a_backlog_longer_than_one_replay_page_in_full(alice, bob, monkeypatch):
    monkeypatch.setattr(consumers, "REPLAY_PAGE", 4)
    for n in range(10):
        await send(alice, payload=n)
    b, welcome = await connect(bob)
    assert welcome["pending"] == 10
    frames = await receive_messages(b, 10)
    assert [f["seq"] for f in frames] == list(range(1, 11))
    # Live messages continue the sequence after the backlog.
    await send(alice, payload="live")
    [live_frame] = await receive_messages(b, 1)
    assert live_frame["seq"] == 11 and live_frame["payload"] == "live"
    await b.disconnect()


async def test_it_keeps_broadcasts_for_offline_agents(alice, bob, carol):
    a, _ = await connect(alice)
    accepted = await request(a, {"type": "broadcast", "payload": "all hands"})
    assert accepted["type"] == "accepted" and accepted["recipients"] == 2
    assert accepted["status"] == "queued"
    for credentials in (bob, carol):
        session, welcome = await connect(credentials)
        assert welcome["pending"] == 1
        [frame] = await receive_messages(session, 1)
        assert frame["kind"] == "broadcast" and frame["payload"] == "all hands"
        assert frame["message_id"] == accepted["message_id"]
        await session.disconnect()
    # The sender does not get its own broadcast.
    assert await a.receive_nothing(0.2)
    await a.disconnect()


async def test_it_keeps_topic_messages_for_offline_subscribers(alice, bob):
    await in_db(services.topic_subscribe)(agent=bob.agent, topic="weather.eu")
    a, _ = await connect(alice)
    accepted = await request(a, {"type": "publish", "topic": "weather.eu", "payload": "rain"})
    assert accepted["recipients"] == 1 and accepted["status"] == "queued"
    b, welcome = await connect(bob)
    assert welcome["pending"] == 1
    [frame] = await receive_messages(b, 1)
    assert frame["kind"] == "topic" and frame["topic"] == "weather.eu"
    assert frame["payload"] == "rain" and frame["from"] == "alice"
    await a.disconnect()
    await b.disconnect()


# --- Acknowledgement and redelivery -------------------------------------------------------------


async def test_it_forgets_messages_acknowledged_by_id_and_resends_the_rest(alice, bob):
    b, _ = await connect(bob)
    await send(alice, payload=1)
    await send(alice, payload=2)
    first, second = await receive_messages(b, 2)
    acked = await request(b, {"type": "ack", "message_ids": [first["message_id"]], "ref": "k"})
    assert acked == {"type": "acked", "ref": "k", "acked": 1}
    await b.disconnect()
    b, welcome = await connect(bob)
    assert welcome["pending"] == 1
    [again] = await receive_messages(b, 1)
    assert again["message_id"] == second["message_id"] and again["seq"] == 2
    assert again["redelivered"] is True and again["attempt"] == 2
    assert await b.receive_nothing(0.2)
    await b.disconnect()


async def test_it_forgets_messages_acknowledged_up_to_a_seq(alice, bob):
    for n in range(3):
        await send(alice, payload=n)
    b, _ = await connect(bob)
    await receive_messages(b, 3)
    acked = await request(b, {"type": "ack", "up_to_seq": 2, "ref": "k"})
    assert acked["acked"] == 2
    await b.disconnect()
    b, welcome = await connect(bob)
    assert welcome["pending"] == 1
    [again] = await receive_messages(b, 1)
    assert again["seq"] == 3 and again["redelivered"] is True
    await b.disconnect()


async def test_it_acknowledges_silently_without_a_ref(alice, bob):
    await send(alice, payload=1)
    b, _ = await connect(bob)
    [frame] = await receive_messages(b, 1)
    await b.send_json_to({"type": "ack", "message_ids": [frame["message_id"]]})
    assert await b.receive_nothing(0.2)
    await eventually(lambda: statuses(bob) == ["acked"])
    await b.disconnect()


async def test_it_resends_unacknowledged_messages_on_every_reconnect_with_a_rising_attempt(
    alice, bob
):
    await send(alice, payload="x")
    seen = []
    for _ in range(3):
        b, _ = await connect(bob)
        [frame] = await receive_messages(b, 1)
        seen.append((frame["redelivered"], frame["attempt"]))
        await b.disconnect()
    assert seen == [(False, 1), (True, 2), (True, 3)]


async def test_it_keeps_an_ack_that_arrives_before_the_delivery_is_recorded(alice, bob):
    b, _ = await connect(bob)
    await send(alice, payload=1)
    [frame] = await receive_messages(b, 1)
    # Acknowledge at once: the "delivered" mark may still wait for its batch, or share it.
    acked = await request(b, {"type": "ack", "message_ids": [frame["message_id"]], "ref": "k"})
    assert acked["acked"] == 1
    await asyncio.sleep(0.2)
    assert await in_db(statuses)(bob) == ["acked"]
    await b.disconnect()
    b, welcome = await connect(bob)
    assert welcome["pending"] == 0
    assert await b.receive_nothing(0.2)
    await b.disconnect()


async def test_the_sweep_resends_due_unacknowledged_messages_to_connected_agents(
    alice, bob, hub_settings
):
    hub_settings(REDELIVERY_DELAY=0)
    b, _ = await connect(bob)
    await send(alice, payload="x")
    [first] = await receive_messages(b, 1)
    await eventually(lambda: statuses(bob) == ["delivered"])
    result = await in_db(tasks.redeliver_due)()
    assert result == {"dead": 0, "replayed_recipients": 1}
    [again] = await receive_messages(b, 1)
    assert again["message_id"] == first["message_id"] and again["seq"] == first["seq"]
    assert again["redelivered"] is True and again["attempt"] == 2
    await b.disconnect()


async def test_the_sweep_does_not_resend_what_was_just_delivered(alice, bob, hub_settings):
    hub_settings(REDELIVERY_DELAY=30)
    b, _ = await connect(bob)
    await send(alice, payload="old")
    await send(alice, payload="new")
    old, _new = await receive_messages(b, 2)
    await eventually(lambda: statuses(bob) == ["delivered", "delivered"])
    # Only the first one is older than the redelivery delay.
    await in_db(
        lambda: Delivery.objects.filter(message_id=old["message_id"]).update(
            delivered_at=F("delivered_at") - timedelta(seconds=60)
        )
    )()
    await in_db(tasks.redeliver_due)()
    [again] = await receive_messages(b, 1)
    assert again["message_id"] == old["message_id"] and again["redelivered"] is True
    assert await b.receive_nothing(0.3)
    await b.disconnect()


async def test_it_dead_letters_a_message_out_of_attempts(alice, bob, hub_settings):
    hub_settings(REDELIVERY_DELAY=0, MAX_DELIVERY_ATTEMPTS=2)
    b, _ = await connect(bob)
    await send(alice, payload="x")
    await receive_messages(b, 1)
    await eventually(lambda: statuses(bob) == ["delivered"])
    assert (await in_db(tasks.redeliver_due)())["dead"] == 0
    [again] = await receive_messages(b, 1)
    assert again["attempt"] == 2
    assert (await in_db(tasks.redeliver_due)())["dead"] == 1
    assert await b.receive_nothing(0.3)
    assert await in_db(statuses)(bob) == ["dead"]
    await b.disconnect()
    b, welcome = await connect(bob)
    assert welcome["pending"] == 0
    assert await b.receive_nothing(0.2)
    await b.disconnect()


async def test_an_operator_can_redeliver_a_dead_letter(alice, bob, hub_settings):
    hub_settings(REDELIVERY_DELAY=0, MAX_DELIVERY_ATTEMPTS=1)
    await send(alice, payload="x")
    b, _ = await connect(bob)
    [frame] = await receive_messages(b, 1)
    await eventually(lambda: statuses(bob) == ["delivered"])
    assert (await in_db(tasks.redeliver_due)())["dead"] == 1
    assert await in_db(lambda: DeadLetter.objects.filter(status="dead").count())() == 1

    def redeliver():
        return services.dead_letters_redeliver(deliveries=list(DeadLetter.objects.all()))

    assert await in_db(redeliver)() == 1
    [again] = await receive_messages(b, 1)
    assert again["message_id"] == frame["message_id"]
    await request(b, {"type": "ack", "message_ids": [again["message_id"]], "ref": "k"})
    assert await in_db(statuses)(bob) == ["acked"]
    await b.disconnect()


async def test_a_dead_letter_redelivered_below_what_was_acked_is_settled_by_the_next_ack(
    alice, bob
):
    for n in range(3):
        await send(alice, payload=n)
    b, _ = await connect(bob)
    await receive_messages(b, 3)
    # seq 2 ran out of attempts meanwhile; the ack up to 3 settles the others.
    await in_db(lambda: Delivery.objects.filter(recipient=bob.agent, seq=2).update(status="dead"))()
    assert (await request(b, {"type": "ack", "up_to_seq": 3, "ref": "k1"}))["acked"] == 2

    def redeliver():
        return services.dead_letters_redeliver(deliveries=list(DeadLetter.objects.all()))

    assert await in_db(redeliver)() == 1
    [again] = await receive_messages(b, 1)
    assert again["seq"] == 2
    # The replay made the engine forget that everything up to 3 was settled.
    assert (await request(b, {"type": "ack", "up_to_seq": 3, "ref": "k2"}))["acked"] == 1
    assert await in_db(statuses)(bob) == ["acked"] * 3
    await b.disconnect()


def test_purging_dead_letters_deletes_only_dead_deliveries(alice, bob, carol):
    services.message_send(sender=alice.agent, kind="direct", to="bob", payload=1)
    services.message_send(sender=alice.agent, kind="direct", to="bob", payload=2)
    services.message_send(sender=alice.agent, kind="direct", to="carol", payload=3)
    Delivery.objects.filter(recipient=bob.agent, seq=1).update(status="dead")
    assert services.dead_letters_purge(deliveries=list(Delivery.objects.all())) == 1
    assert statuses(bob) == ["queued"] and statuses(carol) == ["queued"]


# --- Expiry -------------------------------------------------------------------------------------


async def test_it_expires_undelivered_messages_past_their_ttl(alice, bob, as_agent):
    accepted = await send(alice, payload="soon stale", ttl=0.3)
    await send(alice, payload="fresh")
    await asyncio.sleep(0.4)
    assert await in_db(tasks.expire_deliveries)() == 1
    b, welcome = await connect(bob)
    assert welcome["pending"] == 1
    [frame] = await receive_messages(b, 1)
    assert frame["payload"] == "fresh"
    assert await b.receive_nothing(0.2)
    await b.disconnect()
    detail = await in_db(
        lambda: as_agent(alice).get(f"/api/v1/messages/{accepted.message_id}/").json()
    )()
    assert [d["status"] for d in detail["deliveries"]] == ["expired"]


async def test_it_never_sends_an_expired_message_even_before_the_expiry_sweep(alice, bob, as_agent):
    accepted = await send(alice, payload="stale", ttl=0.2)
    await asyncio.sleep(0.3)
    b, welcome = await connect(bob)
    assert welcome["pending"] == 0
    assert await b.receive_nothing(0.2)
    await b.disconnect()
    detail = await in_db(
        lambda: as_agent(alice).get(f"/api/v1/messages/{accepted.message_id}/").json()
    )()
    assert [d["status"] for d in detail["deliveries"]] == ["expired"]


async def test_it_does_not_redeliver_an_unacknowledged_message_after_it_expires(
    alice, bob, hub_settings
):
    hub_settings(REDELIVERY_DELAY=0)
    b, _ = await connect(bob)
    await send(alice, payload="short-lived", ttl=0.3)
    await receive_messages(b, 1)
    await asyncio.sleep(0.4)
    await in_db(tasks.expire_deliveries)()
    await in_db(tasks.redeliver_due)()
    assert await b.receive_nothing(0.3)
    await b.disconnect()
    b, welcome = await connect(bob)
    assert welcome["pending"] == 0
    await b.disconnect()


# --- Lost nudges, slow readers and concurrent senders -------------------------------------------


@pytest.fixture
def lossy_nudges(monkeypatch):
    """Drop the channel-layer nudges of chosen payloads, as an overloaded layer would."""
    dropped = set()
    original = live.notify_deliveries

    def notify(frames_by_recipient):
        kept = {
            recipient: frame
            for recipient, frame in frames_by_recipient.items()
            if frame["payload"] not in dropped
        }
        original(kept)

    monkeypatch.setattr(live, "notify_deliveries", notify)
    return dropped


async def test_it_fills_a_gap_from_the_database_when_a_nudge_is_lost(alice, bob, lossy_nudges):
    lossy_nudges.add("lost")
    b, _ = await connect(bob)
    await send(alice, payload="lost")
    await send(alice, payload="after")
    frames = await receive_messages(b, 2)
    assert [(f["seq"], f["payload"]) for f in frames] == [(1, "lost"), (2, "after")]
    assert await b.receive_nothing(0.2)
    await b.disconnect()


async def test_it_finds_a_lost_last_nudge_once_the_burst_is_written(alice, bob, lossy_nudges):
    lossy_nudges.add("last")
    b, _ = await connect(bob)
    await send(alice, payload="first")
    await send(alice, payload="last")
    frames = await receive_messages(b, 2)
    assert [(f["seq"], f["payload"]) for f in frames] == [(1, "first"), (2, "last")]
    await b.disconnect()


async def test_a_slow_reader_gets_a_burst_larger_than_the_layer_capacity_in_full(
    alice, bob, settings, isolated_channel_layer, caplog
):
    layers = {**isolated_channel_layer}
    layers["default"] = {
        **layers["default"],
        "CONFIG": {**layers["default"]["CONFIG"], "capacity": 10},
    }
    settings.CHANNEL_LAYERS = layers
    caplog.set_level(logging.INFO, logger="channels_redis.core")
    b, _ = await connect(bob)
    burst = 200

    def send_burst():
        try:
            for n in range(burst):
                services.message_send(sender=alice.agent, kind="direct", to="bob", payload=n)
        finally:
            connections.close_all()

    # Joining the thread blocks this event loop, and with it bob's consumer: nothing reads the
    # channel while the burst is sent, so all but `capacity` nudges are dropped by the layer.
    sender = threading.Thread(target=send_burst)
    sender.start()
    sender.join()
    assert "over capacity" in caplog.text
    frames = await receive_messages(b, burst, timeout=20)
    assert [f["seq"] for f in frames] == list(range(1, burst + 1))
    assert [f["payload"] for f in frames] == list(range(burst))
    assert await b.receive_nothing(0.3)
    await b.disconnect()


async def test_concurrent_senders_reach_a_connected_agent_in_seq_order(make_agent, hub_settings):
    hub_settings(REDELIVERY_DELAY=0)
    target = await in_db(make_agent)("target")
    senders = [(await in_db(make_agent)(f"sender-{i}")).agent for i in range(3)]
    per_sender = 20
    b, _ = await connect(target)

    def send_all(sender):
        try:
            for n in range(per_sender):
                services.message_send(sender=sender, kind="direct", to="target", payload=n)
        finally:
            connections.close_all()

    def sweep_repeatedly(stop):
        try:
            while not stop.is_set():
                services.deliveries_redeliver_due()
                time.sleep(0.01)
        finally:
            connections.close_all()

    stop = threading.Event()
    sweeper = asyncio.create_task(asyncio.to_thread(sweep_repeatedly, stop))
    await asyncio.gather(*(asyncio.to_thread(send_all, sender) for sender in senders))
    total = len(senders) * per_sender
    firsts = []
    seen = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while len(seen) < total:
        frame = await receive_type(b, "message", timeout=max(deadline - loop.time(), 0.01))
        if frame["seq"] not in seen:
            seen.add(frame["seq"])
            firsts.append(frame["seq"])
    stop.set()
    await sweeper
    # Sweeps may resend, but every message first arrives in seq order, none skipped.
    assert firsts == list(range(1, total + 1))
    await b.disconnect()


# --- Retention ----------------------------------------------------------------------------------


def test_purging_old_messages_keeps_those_still_deliverable(alice, bob, carol, hub_settings):
    hub_settings(MESSAGE_RETENTION_DAYS=1)
    settled = services.message_send(sender=alice.agent, kind="direct", to="bob", payload=1)
    services.deliveries_ack(recipient=bob.agent, up_to_seq=1)
    waiting = services.message_send(sender=alice.agent, kind="direct", to="carol", payload=2)
    orphaned = services.message_send(sender=alice.agent, kind="direct", to="bob", payload=3)
    recent = services.message_send(sender=alice.agent, kind="direct", to="bob", payload=4)
    Message.objects.exclude(pk=recent.message_id).update(
        created_at=F("created_at") - timedelta(days=2)
    )
    # bob leaves for good: his unacknowledged old message can never be delivered.
    agent_services.agent_deregister(agent=bob.agent)
    services.messages_purge_old()
    kept = set(Message.objects.values_list("pk", flat=True))
    assert kept == {waiting.message_id, recent.message_id}
    assert settled.message_id not in kept and orphaned.message_id not in kept
    # Their deliveries went with them (the database holds no key from a delivery to its message).
    assert set(Delivery.objects.values_list("message_id", flat=True)) <= kept


async def test_a_session_reads_no_backlog_until_the_agent_was_sent_something(
    alice, bob, monkeypatch
):
    reads = []
    read_backlog = services.pending_frames

    def pending_frames(**kwargs):
        reads.append(kwargs["recipient"].agent_id)
        return read_backlog(**kwargs)

    monkeypatch.setattr(services, "pending_frames", pending_frames)
    b, welcome = await connect(bob)
    assert welcome["pending"] == 0 and reads == []
    await b.disconnect()
    a, _ = await connect(alice)
    await request(a, {"type": "send", "to": "bob", "payload": {"n": 1}, "ref": "s1"})
    b, welcome = await connect(bob)
    assert welcome["pending"] == 1 and "bob" in reads
    message = await receive(b)
    assert message["payload"] == {"n": 1} and message["seq"] == 1
    await a.disconnect()
    await b.disconnect()
