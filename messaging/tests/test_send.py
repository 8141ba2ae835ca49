"""Accepting a send: durable before `accepted`, ordered per recipient, idempotent, honest sender."""

import asyncio
import threading
from unittest import mock

import pytest
from django.db import OperationalError, connections

from messaging import batch, services
from messaging.models import Delivery, Message
from security.services import policies

from .conftest import connect, receive_messages, receive_type, request

pytestmark = pytest.mark.django_db(transaction=True)


def run_threads(count: int, work) -> list:
    """Run work(index) in `count` threads started together; return their results in index order."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list = []

    def target(index):
        try:
            barrier.wait()
            results[index] = work(index)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


def committed(query):
    """Evaluate a query on a fresh database connection: it only sees committed rows."""

    def read():
        try:
            return query()
        finally:
            connections.close_all()

    return asyncio.to_thread(read)


# --- Accept after commit ----------------------------------------------------------------------


async def test_it_answers_accepted_only_once_the_message_and_its_delivery_are_committed(alice, bob):
    a, _ = await connect(alice)
    accepted = await request(a, {"type": "send", "to": "bob", "payload": {"n": 1}, "ref": "r1"})
    assert accepted["type"] == "accepted" and accepted["ref"] == "r1"
    assert accepted["status"] == "queued" and accepted["recipients"] == 1
    assert accepted["duplicate"] is False
    # Another connection sees both rows at the moment the sender hears `accepted`.
    rows = await committed(
        lambda: list(
            Delivery.objects.filter(message_id=accepted["message_id"]).values_list(
                "recipient__agent_id", "seq", "status"
            )
        )
    )
    assert rows == [("bob", 1, "queued")]
    await a.disconnect()


async def test_it_answers_unavailable_and_stores_nothing_while_the_database_refuses_writes(
    alice, bob, locked_database
):
    a, _ = await connect(alice)
    await locked_database.hold()
    answer = await request(a, {"type": "send", "to": "bob", "payload": {"n": 1}, "ref": "r1"}, 5)
    locked_database.release()
    assert answer["type"] == "error" and answer["code"] == "unavailable", answer
    assert answer["ref"] == "r1" and answer["retry_after"] >= 1
    assert await committed(lambda: Message.objects.count()) == 0
    # The connection stays usable: the retry is accepted.
    retry = await request(a, {"type": "send", "to": "bob", "payload": {"n": 1}, "ref": "r2"}, 5)
    assert retry["type"] == "accepted" and retry["ref"] == "r2"
    assert await committed(lambda: Message.objects.count()) == 1
    await a.disconnect()


async def test_it_never_answers_accepted_when_the_commit_fails(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    wrapper = type(connections["default"])

    def failing_commit(self):
        # What the backend raises when the server goes away between the writes and COMMIT.
        raise OperationalError("server closed the connection unexpectedly")

    def failing_driver_commit(cursor, *statement):
        raise OperationalError("server closed the connection unexpectedly")

    # Django's commit, and the batch writer's on the driver's cursor.
    with (
        mock.patch.object(wrapper, "_commit", failing_commit),
        mock.patch.object(batch, "_commit", failing_driver_commit),
    ):
        answer = await request(a, {"type": "send", "to": "bob", "payload": {}, "ref": "r1"}, 5)
    assert answer["type"] == "error" and answer["code"] == "unavailable", answer
    assert answer["retry_after"] >= 1
    assert await committed(lambda: Message.objects.count()) == 0
    # Nothing that was rolled back reaches the recipient.
    assert await b.receive_nothing(0.3)
    await a.disconnect()
    await b.disconnect()


# --- Ordering -----------------------------------------------------------------------------------


def test_it_numbers_each_recipients_messages_without_gaps_under_concurrent_senders(make_agent):
    recipient = make_agent("target")
    senders = [make_agent(f"sender-{i}").agent for i in range(4)]
    per_sender = 15

    def send_all(index):
        seqs = []
        for n in range(per_sender):
            accepted = services.message_send(
                sender=senders[index], kind="direct", to="target", payload={"n": n}
            )
            seqs.append(
                Delivery.objects.get(message_id=accepted.message_id, recipient=recipient.agent).seq
            )
        return seqs

    results = run_threads(len(senders), send_all)
    for seqs in results:
        # Each sender's messages are numbered in the order it had them accepted.
        assert seqs == sorted(seqs) and len(set(seqs)) == per_sender
    all_seqs = sorted(seq for seqs in results for seq in seqs)
    assert all_seqs == list(range(1, len(senders) * per_sender + 1))


def test_it_numbers_broadcasts_and_directs_in_one_sequence_per_recipient(alice, bob, carol):
    services.message_send(sender=alice.agent, kind="direct", to="bob", payload=1)
    services.message_send(sender=carol.agent, kind="broadcast", payload=2)
    services.message_send(sender=alice.agent, kind="direct", to="carol", payload=3)
    services.message_send(sender=alice.agent, kind="broadcast", payload=4)
    rows = Delivery.objects.order_by("recipient__agent_id", "seq").values_list(
        "recipient__agent_id", "seq", "message__payload"
    )
    assert list(rows) == [
        ("alice", 1, 2),
        ("bob", 1, 1),
        ("bob", 2, 2),
        ("bob", 3, 4),
        ("carol", 1, 3),
        ("carol", 2, 4),
    ]


# --- Idempotent sends ---------------------------------------------------------------------------


def test_it_answers_a_repeated_client_id_with_the_first_message(alice, bob):
    first = services.message_send(
        sender=alice.agent, kind="direct", to="bob", payload={"n": 1}, client_id="c-1"
    )
    again = services.message_send(
        sender=alice.agent, kind="direct", to="bob", payload={"n": 2}, client_id="c-1"
    )
    assert again.duplicate is True and first.duplicate is False
    assert again.message_id == first.message_id and again.recipients == 1
    assert Message.objects.count() == 1 and Delivery.objects.count() == 1


def test_it_scopes_client_ids_to_their_sender(alice, bob):
    first = services.message_send(
        sender=alice.agent, kind="direct", to="bob", payload=1, client_id="c-1"
    )
    other = services.message_send(
        sender=bob.agent, kind="direct", to="alice", payload=1, client_id="c-1"
    )
    assert other.duplicate is False and other.message_id != first.message_id


def test_it_stores_one_message_for_concurrent_repeats_of_a_client_id(alice, bob):
    results = run_threads(
        6,
        lambda _index: services.message_send(
            sender=alice.agent, kind="direct", to="bob", payload={}, client_id="same"
        ),
    )
    assert len({result.message_id for result in results}) == 1
    assert sorted(result.duplicate for result in results) == [False] + [True] * 5
    assert Message.objects.count() == 1 and Delivery.objects.count() == 1


def test_it_reports_a_duplicates_current_delivery_state(alice, bob):
    first = services.message_send(
        sender=alice.agent, kind="direct", to="bob", payload={}, client_id="c-1"
    )
    assert first.status == "queued"
    assert (
        services.message_send(
            sender=alice.agent, kind="direct", to="bob", payload={}, client_id="c-1"
        ).status
        == "queued"
    )
    services.pending_frames(recipient=bob.agent)
    services.deliveries_ack(recipient=bob.agent, up_to_seq=1)
    again = services.message_send(
        sender=alice.agent, kind="direct", to="bob", payload={}, client_id="c-1"
    )
    assert again.status == "delivered" and again.duplicate is True


def test_it_does_not_call_an_expired_duplicate_delivered(alice, bob):
    services.message_send(
        sender=alice.agent, kind="direct", to="bob", payload={}, client_id="c-1", ttl=60
    )
    Delivery.objects.update(status=Delivery.Status.EXPIRED)
    again = services.message_send(
        sender=alice.agent, kind="direct", to="bob", payload={}, client_id="c-1"
    )
    assert again.duplicate is True and again.status == "queued"


async def test_it_delivers_a_repeated_send_only_once(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    frame = {"type": "send", "to": "bob", "payload": {"n": 1}, "id": "client-1"}
    first = await request(a, {**frame, "ref": "r1"})
    second = await request(a, {**frame, "ref": "r2"})
    assert first["duplicate"] is False and second["duplicate"] is True
    assert second["message_id"] == first["message_id"] and second["ref"] == "r2"
    [message] = await receive_messages(b, 1)
    assert message["message_id"] == first["message_id"]
    assert await b.receive_nothing(0.3)
    await a.disconnect()
    await b.disconnect()


# --- The sender is who authenticated ------------------------------------------------------------


async def test_it_records_the_authenticated_agent_as_sender_whatever_the_frame_says(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    accepted = await request(
        a, {"type": "send", "to": "bob", "from": "mallory", "sender": "mallory", "payload": 1}
    )
    assert accepted["type"] == "accepted"
    [message] = await receive_messages(b, 1)
    assert message["from"] == "alice"
    stored = await committed(
        lambda: Message.objects.select_related("sender").get(pk=accepted["message_id"])
    )
    assert stored.sender.agent_id == "alice"
    await a.disconnect()
    await b.disconnect()


def test_it_records_the_authenticated_agent_as_sender_over_rest(alice, bob, as_agent):
    response = as_agent(alice).post(
        "/api/v1/messages/", {"to": "bob", "from": "mallory", "payload": 1}, format="json"
    )
    assert response.status_code == 201
    assert Message.objects.get(pk=response.json()["message_id"]).sender == alice.agent
    [frame] = services.pending_frames(recipient=bob.agent)
    assert frame["from"] == "alice"


# --- Cost of the hot path ------------------------------------------------------------------------


def test_it_sends_a_direct_message_in_a_bounded_number_of_queries(
    alice, bob, django_assert_num_queries
):
    # Warm the recipient's mailbox: the first message to an agent also creates it.
    services.message_send(sender=alice.agent, kind="direct", to="bob", payload=0)
    # The access policies are cached for two seconds: a cache the warm-up found still fresh
    # could lapse before the send counted (two more queries, seen on a loaded CI machine).
    policies.reload()
    # Recipient lookup, BEGIN, message insert, mailbox lock, bump and read, delivery insert,
    # connected check, COMMIT (the same on SQLite and PostgreSQL).
    with django_assert_num_queries(9):
        services.message_send(sender=alice.agent, kind="direct", to="bob", payload=1)


async def test_it_answers_delivered_when_the_recipient_is_connected(alice, bob):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    accepted = await request(a, {"type": "send", "to": "bob", "payload": 1, "ref": "x"})
    assert accepted["status"] == "delivered"
    message = await receive_type(b, "message")
    assert message["message_id"] == accepted["message_id"]
    await a.disconnect()
    await b.disconnect()
