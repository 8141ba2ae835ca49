"""A refused action answers forbidden, delivers or changes nothing, and is in the audit log.

The same policies govern REST and the WebSocket, because both call the same services.
"""

import pytest

from contexts.models import ContextEntry
from messaging.models import Delivery, Message, Subscription
from security.models import AuditEvent

from .conftest import connect, in_db, request

MESSAGES = "/api/v1/messages/"
CONTEXTS = "/api/v1/contexts/"


def refusal(actor: str, action: str, target: str) -> AuditEvent:
    return AuditEvent.objects.get(actor=actor, action=action, target=target, outcome="refused")


# --- REST -----------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("action", "target", "body"),
    [
        ("send", "bob", {"to": "bob"}),
        ("publish", "alerts.fraud", {"topic": "alerts.fraud"}),
        ("broadcast", "*", {"broadcast": True}),
    ],
)
def test_a_refused_rest_send_answers_403_stores_nothing_and_is_audited(
    action, target, body, alice, bob, as_agent, deny
):
    Subscription.objects.create(agent=bob.agent, topic="alerts.fraud")
    deny("alice", action, "alerts.*" if action == "publish" else target)
    response = as_agent(alice).post(MESSAGES, {**body, "payload": {"x": 1}}, format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert not Message.objects.exists() and not Delivery.objects.exists()
    event = refusal("alice", action, target)
    assert event.actor_type == "agent" and event.source == "127.0.0.1"


@pytest.mark.django_db
def test_default_deny_refuses_what_no_policy_allows(alice, bob, as_agent, default_deny):
    default_deny()
    response = as_agent(alice).post(MESSAGES, {"to": "bob", "payload": {}}, format="json")
    assert response.status_code == 403
    assert refusal("alice", "send", "bob")


@pytest.mark.django_db
def test_a_refused_context_write_creates_nothing_and_is_audited(alice, as_agent, deny):
    deny("alice", "context_write", "error")
    response = as_agent(alice).post(
        CONTEXTS, {"context_type": "error", "payload": {}}, format="json"
    )
    assert response.status_code == 403 and response.json()["code"] == "forbidden"
    assert not ContextEntry.objects.exists()
    assert refusal("alice", "context_write", "error")


@pytest.mark.django_db
def test_a_refused_update_or_delete_leaves_the_entry_as_it_was(alice, as_agent, deny):
    created = as_agent(alice).post(
        CONTEXTS, {"context_type": "error", "payload": {"v": 1}}, format="json"
    )
    url = f"{CONTEXTS}{created.json()['context_id']}/"
    deny("alice", "context_write", "error")
    patched = as_agent(alice).patch(url, {"payload": {"v": 2}}, format="json", HTTP_IF_MATCH='"1"')
    deleted = as_agent(alice).delete(url)
    assert (patched.status_code, deleted.status_code) == (403, 403)
    entry = ContextEntry.objects.get()
    assert (entry.version, entry.payload) == (1, {"v": 1})
    # Both refusals are kept, although each was raised inside a transaction that rolled back.
    events = AuditEvent.objects.filter(actor="alice", action="context_write", outcome="refused")
    assert events.count() == 2
    assert {e.detail["context_id"] for e in events} == {str(entry.pk)}


@pytest.mark.django_db
def test_another_agents_attempt_to_change_an_entry_is_audited(alice, bob, as_agent):
    created = as_agent(alice).post(
        CONTEXTS, {"context_type": "task_result", "payload": {}}, format="json"
    )
    url = f"{CONTEXTS}{created.json()['context_id']}/"
    assert (
        as_agent(bob).put(url, {"payload": {}}, format="json", HTTP_IF_MATCH='"1"').status_code
        == 403
    )
    assert as_agent(bob).delete(url).status_code == 403
    events = AuditEvent.objects.filter(actor="bob", action="context_write", outcome="refused")
    assert [e.detail["reason"] for e in events] == ["not the owner", "not the owner"]


@pytest.mark.django_db
def test_a_refused_read_answers_403_on_every_read_endpoint(alice, bob, as_agent, deny):
    created = as_agent(alice).post(
        CONTEXTS, {"context_type": "error", "payload": {"secret": "s3"}}, format="json"
    )
    entry_url = f"{CONTEXTS}{created.json()['context_id']}/"
    deny("bob", "context_read", "error")
    for url in (entry_url, f"{entry_url}versions/", f"{entry_url}versions/1/"):
        response = as_agent(bob).get(url)
        assert response.status_code == 403, url
        assert "s3" not in response.content.decode()
    assert (
        AuditEvent.objects.filter(actor="bob", action="context_read", outcome="refused").count()
        == 3
    )
    assert as_agent(alice).get(entry_url).status_code == 200


@pytest.mark.django_db
def test_a_query_leaves_out_unreadable_types_and_refuses_when_one_is_named(
    alice, bob, as_agent, deny
):
    """Without context_type the list is filtered (no refusal); naming a denied type is refused."""
    for context_type in ("error", "task_result"):
        as_agent(alice).post(
            CONTEXTS, {"context_type": context_type, "payload": {"t": context_type}}, format="json"
        )
    deny("bob", "context_read", "error")
    listed = as_agent(bob).get(CONTEXTS).json()
    assert [row["context_type"] for row in listed["results"]] == ["task_result"]
    assert listed["count"] == 1
    assert not AuditEvent.objects.filter(outcome="refused").exists()
    named = as_agent(bob).get(CONTEXTS, {"context_type": "error"})
    assert named.status_code == 403
    assert refusal("bob", "context_read", "error")
    assert as_agent(bob).get(CONTEXTS, {"context_type": "task_result"}).status_code == 200


@pytest.mark.django_db
def test_operators_are_governed_by_model_permissions_not_policies(
    alice, api, operator_tokens, as_agent, deny
):
    as_agent(alice).post(CONTEXTS, {"context_type": "metadata", "payload": {}}, format="json")
    deny(None, "context_read")
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}")
    assert api.get(CONTEXTS).json()["count"] == 1
    assert as_agent(alice).get(CONTEXTS).json()["count"] == 0


# --- WebSocket ------------------------------------------------------------------------------------

ws = pytest.mark.django_db(transaction=True)


@ws
@pytest.mark.parametrize(
    ("frame", "action", "target"),
    [
        ({"type": "send", "to": "bob"}, "send", "bob"),
        ({"type": "request", "to": "bob"}, "send", "bob"),
        ({"type": "request", "capability": "credit-score"}, "send", "bob"),
        ({"type": "publish", "topic": "alerts.fraud"}, "publish", "alerts.fraud"),
        ({"type": "broadcast"}, "broadcast", "*"),
    ],
)
async def test_a_refused_frame_answers_forbidden_and_delivers_nothing(
    frame, action, target, alice, bob, deny
):
    await in_db(Subscription.objects.create)(agent=bob.agent, topic="alerts.fraud")
    await in_db(deny)("alice", action, target)
    a, b = await connect(alice), await connect(bob)
    answer = await request(a, {**frame, "payload": {"x": 1}, "ref": "r1"})
    assert answer["type"] == "error" and answer["code"] == "forbidden" and answer["ref"] == "r1"
    assert await b.receive_nothing(0.3)
    assert not await in_db(Message.objects.exists)()
    assert await in_db(refusal)("alice", action, target)
    # The socket stays open and usable.
    assert (await request(a, {"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await a.disconnect()
    await b.disconnect()


@ws
async def test_a_refused_subscribe_answers_forbidden_and_subscribes_nothing(alice, deny):
    await in_db(deny)("alice", "subscribe", "secret.*")
    a = await connect(alice)
    answer = await request(a, {"type": "subscribe", "topic": "secret.plans", "ref": "s"})
    assert answer["code"] == "forbidden" and answer["ref"] == "s"
    assert not await in_db(Subscription.objects.exists)()
    assert await in_db(refusal)("alice", "subscribe", "secret.plans")
    allowed = await request(a, {"type": "subscribe", "topic": "news", "ref": "n"})
    assert allowed["type"] == "subscribed"
    await a.disconnect()


@ws
async def test_a_subscriber_no_longer_allowed_to_subscribe_gets_nothing(alice, bob, deny):
    a, b = await connect(alice), await connect(bob)
    assert (await request(b, {"type": "subscribe", "topic": "alerts.x"}))["type"] == "subscribed"
    await in_db(deny)("bob", "subscribe", "alerts.*")
    accepted = await request(a, {"type": "publish", "topic": "alerts.x", "payload": {}})
    assert accepted["type"] == "accepted" and accepted["recipients"] == 0
    assert await b.receive_nothing(0.3)
    await a.disconnect()
    await b.disconnect()


@ws
async def test_a_refused_watch_answers_forbidden_and_is_audited(alice, deny):
    await in_db(deny)("alice", "context_read", "error")
    a = await connect(alice)
    answer = await request(a, {"type": "watch", "context_type": "error", "ref": "w"})
    assert answer["code"] == "forbidden" and answer["ref"] == "w"
    assert await in_db(refusal)("alice", "context_read", "error")
    await a.disconnect()


@ws
async def test_the_socket_and_rest_refuse_identically(alice, bob, deny, as_agent):
    await in_db(deny)("alice", "send", "bob")
    a = await connect(alice)
    frame = await request(a, {"type": "send", "to": "bob", "payload": {}})
    rest = await in_db(
        lambda: as_agent(alice).post(MESSAGES, {"to": "bob", "payload": {}}, format="json")
    )()
    assert (frame["code"], frame["detail"]) == (rest.json()["code"], rest.json()["detail"])
    assert (
        await in_db(
            AuditEvent.objects.filter(actor="alice", action="send", outcome="refused").count
        )()
        == 2
    )
    await a.disconnect()
