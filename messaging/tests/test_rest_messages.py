"""The messaging REST API: send, inbox, ack and message detail."""

import uuid

import pytest

from messaging import services
from messaging.models import Delivery, Message

from .conftest import in_db

pytestmark = pytest.mark.django_db

SEND = "/api/v1/messages/"
INBOX = "/api/v1/messages/inbox/"
ACK = "/api/v1/messages/ack/"


def detail_url(message_id) -> str:
    return f"/api/v1/messages/{message_id}/"


def post(client, url, body):
    return client.post(url, body, format="json")


# --- Send ---------------------------------------------------------------------------------------


def test_it_accepts_a_direct_message(alice, bob, as_agent):
    response = post(as_agent(alice), SEND, {"to": "bob", "payload": {"task": 1}, "ttl": 60})
    assert response.status_code == 201
    body = response.json()
    assert body == {
        "message_id": body["message_id"],
        "status": "queued",
        "recipients": 1,
        "duplicate": False,
    }
    message = Message.objects.get(pk=body["message_id"])
    assert message.kind == "direct" and message.payload == {"task": 1}
    assert message.expires_at is not None
    assert message.deliveries.get().recipient == bob.agent


def test_it_accepts_a_broadcast_and_a_topic_message(alice, bob, carol, as_agent):
    services.topic_subscribe(agent=carol.agent, topic="jobs")
    broadcast = post(as_agent(alice), SEND, {"broadcast": True, "payload": 1})
    assert broadcast.status_code == 201 and broadcast.json()["recipients"] == 2
    published = post(as_agent(alice), SEND, {"topic": "jobs", "payload": 2})
    assert published.status_code == 201 and published.json()["recipients"] == 1
    assert Message.objects.get(pk=published.json()["message_id"]).kind == "topic"


def test_it_accepts_any_json_payload_including_null(alice, bob, as_agent):
    for payload in (None, 0, "text", [1, 2], {"nested": {"a": [None]}}):
        response = post(as_agent(alice), SEND, {"to": "bob", "payload": payload})
        assert response.status_code == 201, response.json()
        assert Message.objects.get(pk=response.json()["message_id"]).payload == payload


@pytest.mark.parametrize(
    "body",
    [
        {"payload": 1},
        {"to": "bob", "topic": "jobs", "payload": 1},
        {"to": "bob", "broadcast": True, "payload": 1},
        {"topic": "jobs", "broadcast": True, "payload": 1},
    ],
)
def test_it_requires_exactly_one_destination(alice, bob, as_agent, body):
    response = post(as_agent(alice), SEND, body)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert "to" in response.json()["errors"]
    assert Message.objects.count() == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": "Bob!", "payload": 1}, "to"),
        ({"topic": "no spaces", "payload": 1}, "topic"),
        ({"topic": "x" * 101, "payload": 1}, "topic"),
        ({"to": "bob"}, "payload"),
        ({"to": "bob", "payload": 1, "ttl": 0}, "ttl"),
        ({"to": "bob", "payload": 1, "id": "x" * 129}, "id"),
    ],
)
def test_it_names_the_invalid_field(alice, bob, as_agent, body, field):
    response = post(as_agent(alice), SEND, body)
    assert response.status_code == 400
    assert field in response.json()["errors"]


def test_it_answers_404_with_json_for_an_unknown_recipient(alice, as_agent):
    response = post(as_agent(alice), SEND, {"to": "nobody", "payload": 1})
    assert response.status_code == 404
    assert response.json()["code"] == "unknown_recipient"
    assert "nobody" in response.json()["detail"]
    assert Message.objects.count() == 0


def test_it_refuses_a_message_to_a_deregistered_agent(alice, bob, as_agent):
    from agents import services as agent_services

    agent_services.agent_deregister(agent=bob.agent)
    response = post(as_agent(alice), SEND, {"to": "bob", "payload": 1})
    assert response.status_code == 404 and response.json()["code"] == "unknown_recipient"


def test_it_answers_413_for_a_payload_over_the_limit(alice, bob, as_agent, hub_settings):
    hub_settings(MAX_PAYLOAD_BYTES=1024)
    response = post(as_agent(alice), SEND, {"to": "bob", "payload": "x" * 2000})
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert Message.objects.count() == 0


def test_it_answers_413_for_a_body_over_the_request_limit(alice, bob, as_agent, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    response = post(as_agent(alice), SEND, {"to": "bob", "payload": "x" * 5000})
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


def test_it_answers_a_repeated_client_id_with_the_first_message(alice, bob, as_agent):
    client = as_agent(alice)
    first = post(client, SEND, {"to": "bob", "payload": 1, "id": "job-7"}).json()
    again = post(client, SEND, {"to": "bob", "payload": 1, "id": "job-7"})
    assert again.status_code == 201
    assert again.json()["message_id"] == first["message_id"]
    assert again.json()["duplicate"] is True
    assert Delivery.objects.count() == 1


def test_it_refuses_unauthenticated_and_operator_senders(api, alice, operator_tokens):
    assert post(api, SEND, {"to": "alice", "payload": 1}).status_code == 401
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}")
    response = post(api, SEND, {"to": "alice", "payload": 1})
    assert response.status_code == 403 and "code" in response.json()


@pytest.mark.django_db(transaction=True)
async def test_it_answers_503_unavailable_while_the_database_refuses_writes(
    alice, bob, as_agent, locked_database
):
    client = as_agent(alice)
    await locked_database.hold()
    response = await in_db(lambda: post(client, SEND, {"to": "bob", "payload": 1}))()
    locked_database.release()
    assert response.status_code == 503
    assert response.json()["code"] == "unavailable" and response.json()["retry_after"] >= 1
    assert response["Retry-After"] == "1"
    assert await in_db(Message.objects.count)() == 0


# --- Inbox --------------------------------------------------------------------------------------


def send_to_bob(alice, count):
    return [
        services.message_send(sender=alice.agent, kind="direct", to="bob", payload=n)
        for n in range(count)
    ]


def test_the_inbox_lists_pending_messages_oldest_first(alice, bob, as_agent):
    sent = send_to_bob(alice, 3)
    response = as_agent(bob).get(INBOX)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [m["seq"] for m in results] == [1, 2, 3]
    assert [m["message_id"] for m in results] == [str(a.message_id) for a in sent]
    first = results[0]
    assert first["type"] == "message" and first["from"] == "alice" and first["kind"] == "direct"
    assert first["redelivered"] is False and first["attempt"] == 1


def test_the_inbox_pages_with_after_seq_and_limit(alice, bob, as_agent):
    send_to_bob(alice, 5)
    client = as_agent(bob)
    page = client.get(INBOX, {"after_seq": 1, "limit": 2}).json()["results"]
    assert [m["seq"] for m in page] == [2, 3]
    page = client.get(INBOX, {"after_seq": 3, "limit": 10}).json()["results"]
    assert [m["seq"] for m in page] == [4, 5]


def test_the_inbox_marks_repeated_reads_as_redelivered(alice, bob, as_agent):
    send_to_bob(alice, 1)
    client = as_agent(bob)
    client.get(INBOX)
    [again] = client.get(INBOX).json()["results"]
    assert again["redelivered"] is True and again["attempt"] == 2


@pytest.mark.parametrize(
    "query", [{"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"after_seq": -1}]
)
def test_the_inbox_names_an_invalid_query_parameter(bob, as_agent, query):
    response = as_agent(bob).get(INBOX, query)
    assert response.status_code == 400
    assert set(query) <= set(response.json()["errors"])


def test_the_inbox_shows_only_the_callers_messages(alice, bob, carol, as_agent):
    send_to_bob(alice, 2)
    assert as_agent(carol).get(INBOX).json()["results"] == []


# --- Ack ----------------------------------------------------------------------------------------


def test_it_acknowledges_by_message_ids(alice, bob, as_agent):
    first, second = send_to_bob(alice, 2)
    client = as_agent(bob)
    response = post(client, ACK, {"message_ids": [str(first.message_id), str(uuid.uuid4())]})
    assert response.status_code == 200 and response.json() == {"acked": 1}
    assert [m["message_id"] for m in client.get(INBOX).json()["results"]] == [
        str(second.message_id)
    ]


def test_it_acknowledges_up_to_a_seq(alice, bob, as_agent):
    send_to_bob(alice, 3)
    client = as_agent(bob)
    assert post(client, ACK, {"up_to_seq": 2}).json() == {"acked": 2}
    assert [m["seq"] for m in client.get(INBOX).json()["results"]] == [3]
    # Acknowledging again changes nothing.
    assert post(client, ACK, {"up_to_seq": 2}).json() == {"acked": 0}


def test_it_ignores_acks_for_other_agents_messages(alice, bob, carol, as_agent):
    [sent] = send_to_bob(alice, 1)
    response = post(as_agent(carol), ACK, {"message_ids": [str(sent.message_id)]})
    assert response.json() == {"acked": 0}
    assert Delivery.objects.get().status == "queued"


@pytest.mark.parametrize(
    "body",
    [{}, {"message_ids": ["not-a-uuid"]}, {"message_ids": [], "up_to_seq": 1}, {"up_to_seq": -1}],
)
def test_it_names_the_invalid_ack_field(bob, as_agent, body):
    response = post(as_agent(bob), ACK, body)
    assert response.status_code == 400
    assert set(response.json()["errors"]) & {"message_ids", "up_to_seq"}


# --- Message detail -----------------------------------------------------------------------------


def test_the_sender_sees_every_recipients_delivery_state(alice, bob, carol, as_agent):
    accepted = services.message_send(sender=alice.agent, kind="broadcast", payload="hi")
    services.pending_frames(recipient=bob.agent)
    services.deliveries_ack(recipient=bob.agent, up_to_seq=1)
    response = as_agent(alice).get(detail_url(accepted.message_id))
    assert response.status_code == 200
    body = response.json()
    assert body["message_id"] == str(accepted.message_id) and body["sender"] == "alice"
    assert body["kind"] == "broadcast" and body["payload"] == "hi"
    states = {d["recipient"]: d["status"] for d in body["deliveries"]}
    assert states == {"bob": "acked", "carol": "queued"}


def test_a_recipient_sees_only_its_own_delivery(alice, bob, carol, as_agent):
    accepted = services.message_send(sender=alice.agent, kind="broadcast", payload="hi")
    body = as_agent(bob).get(detail_url(accepted.message_id)).json()
    assert [d["recipient"] for d in body["deliveries"]] == ["bob"]


def test_others_cannot_read_a_message(alice, bob, carol, as_agent):
    accepted = services.message_send(sender=alice.agent, kind="direct", to="bob", payload=1)
    response = as_agent(carol).get(detail_url(accepted.message_id))
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    # The same answer as for a message that does not exist: nothing leaks.
    missing = as_agent(carol).get(detail_url(uuid.uuid4()))
    assert missing.status_code == 404 and missing.json() == response.json()
