from datetime import timedelta

import pytest
from django.db import connection as db_connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from messaging import services
from messaging.models import DeadLetter, Delivery, Message, Subscription
from security.models import AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


def changelist(model):
    return reverse(f"admin:messaging_{model._meta.model_name}_changelist")


def change(model, pk):
    return reverse(f"admin:messaging_{model._meta.model_name}_change", args=[pk])


def results(response):
    assert response.status_code == 200
    return list(response.context["cl"].result_list)


def send(sender, to, payload=None, **fields):
    accepted = services.message_send(
        sender=sender.agent, kind="direct", to=to, payload=payload or {"n": 1}, **fields
    )
    return Message.objects.get(pk=accepted.message_id)


def broadcast(sender, payload=None):
    accepted = services.message_send(sender=sender.agent, kind="broadcast", payload=payload or {})
    return Message.objects.get(pk=accepted.message_id)


def kill(message, recipient):
    """Turn one delivery into a dead letter, as the redelivery sweep does."""
    delivery = Delivery.objects.get(message=message, recipient=recipient.agent)
    Delivery.objects.filter(pk=delivery.pk).update(
        status=Delivery.Status.DEAD, attempts=5, delivered_at=timezone.now()
    )
    return delivery


def run_action(client, model, action, objects):
    data = {"action": action, "_selected_action": [obj.pk for obj in objects]}
    return client.post(changelist(model), data, follow=True)


# --- Pages render -------------------------------------------------------------------------------


def test_every_messaging_changelist_and_change_page_renders(operator_client, alice, bob, carol):
    message = broadcast(alice)
    dead = kill(message, bob)
    delivery = Delivery.objects.get(message=message, recipient=carol.agent)
    subscription = Subscription.objects.create(agent=bob.agent, topic="jobs")
    for model, obj in (
        (Message, message),
        (Delivery, delivery),
        (DeadLetter, dead),
        (Subscription, subscription),
    ):
        assert obj.pk in [row.pk for row in results(operator_client.get(changelist(model)))]
        assert operator_client.get(change(model, obj.pk)).status_code == 200


def test_message_log_is_read_only(operator_client, alice, bob):
    message = send(alice, "bob")
    assert operator_client.get(reverse("admin:messaging_message_add")).status_code == 403
    assert operator_client.post(change(Message, message.pk), {"topic": "x"}).status_code == 403
    delete = reverse("admin:messaging_message_delete", args=[message.pk])
    assert operator_client.post(delete, {"post": "yes"}).status_code == 403
    assert Message.objects.filter(pk=message.pk).exists()


def test_message_page_shows_each_recipients_delivery_state(operator_client, alice, bob, carol):
    message = broadcast(alice)
    services.deliveries_ack(recipient=bob.agent, message_ids=[message.pk])
    html = operator_client.get(change(Message, message.pk)).content.decode()
    assert "1 queued, 1 acked" in html
    inline = operator_client.get(change(Message, message.pk)).context["inline_admin_formsets"][0]
    states = {form.original.recipient.agent_id: form.original.status for form in inline}
    assert states == {"bob": "acked", "carol": "queued"}


def test_message_page_links_to_its_full_delivery_list(operator_client, alice, bob, carol):
    message = broadcast(alice)
    send(alice, "bob")
    html = operator_client.get(change(Message, message.pk)).content.decode()
    url = f"{changelist(Delivery)}?message__exact={message.pk}"
    assert url in html
    listed = results(operator_client.get(url))
    assert sorted(d.recipient.agent_id for d in listed) == ["bob", "carol"]
    assert {d.message_id for d in listed} == {message.pk}


def test_message_page_escapes_and_pretty_prints_the_payload(operator_client, alice, bob):
    message = send(alice, "bob", {"note": "<script>alert(1)</script>", "n": [1, 2]})
    html = operator_client.get(change(Message, message.pk)).content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # Indented JSON; PostgreSQL's jsonb may reorder keys, so no key order is assumed.
    pretty = html.split("<pre>", 1)[1].split("</pre>", 1)[0]
    assert "\n  &quot;note&quot;: &quot;&lt;script&gt;" in pretty
    assert "\n  &quot;n&quot;: [\n    1,\n    2\n  ]" in pretty


def test_message_list_shows_expired_deliveries(operator_client, alice, bob):
    message = send(alice, "bob", ttl=1)
    Delivery.objects.filter(message=message).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert services.deliveries_expire() == 1
    html = operator_client.get(changelist(Message)).content.decode()
    assert "1 expired" in html
    listed = results(operator_client.get(changelist(Message), {"delivery_status": "expired"}))
    assert listed == [message]
    expired = results(operator_client.get(changelist(Delivery), {"status__exact": "expired"}))
    assert [d.message_id for d in expired] == [message.pk]


def test_message_list_query_count_does_not_grow_with_messages(operator_client, alice, bob, carol):
    broadcast(alice)

    def queries():
        with CaptureQueriesContext(db_connection) as captured:
            assert operator_client.get(changelist(Message)).status_code == 200
        return len(captured)

    few = queries()
    for n in range(5):
        broadcast(bob, {"n": n})
        send(carol, "alice")
    assert queries() == few


# --- Searching and filtering the log -------------------------------------------------------------


@pytest.fixture
def log(alice, bob, carol):
    return {
        "to_bob": send(alice, "bob", client_id="job-1"),
        "to_carol": send(alice, "carol"),
        "from_bob": send(bob, "alice"),
        "everyone": broadcast(carol),
    }


@pytest.mark.parametrize(
    "term, expected",
    [
        ("alice", {"to_bob", "to_carol", "from_bob", "everyone"}),  # as sender or recipient
        ("bob", {"to_bob", "from_bob", "everyone"}),
        ("job-1", {"to_bob"}),
        ("nobody", set()),
    ],
)
def test_message_log_searches_senders_recipients_and_client_ids(
    operator_client, log, term, expected
):
    found = results(operator_client.get(changelist(Message), {"q": term}))
    assert {pk for pk, m in log.items() if m in found} == expected
    assert len(found) == len(expected)


def test_message_log_finds_a_message_by_its_id(operator_client, log):
    found = results(operator_client.get(changelist(Message), {"q": str(log["to_carol"].pk)}))
    assert found == [log["to_carol"]]


def test_message_log_filters_by_sender_recipient_and_kind(operator_client, log):
    by_sender = results(operator_client.get(changelist(Message), {"sender": "alice"}))
    assert set(by_sender) == {log["to_bob"], log["to_carol"]}
    by_recipient = results(operator_client.get(changelist(Message), {"recipient": "carol"}))
    assert by_recipient == [log["to_carol"]]
    by_kind = results(operator_client.get(changelist(Message), {"kind__exact": "broadcast"}))
    assert by_kind == [log["everyone"]]
    both = results(
        operator_client.get(changelist(Message), {"sender": "alice", "recipient": "bob"})
    )
    assert both == [log["to_bob"]]


def test_message_log_filters_by_date(operator_client, log):
    today = timezone.now()
    Message.objects.filter(pk=log["from_bob"].pk).update(created_at=today - timedelta(days=400))
    this_year = results(operator_client.get(changelist(Message), {"created_at__year": today.year}))
    assert log["from_bob"] not in this_year and log["to_bob"] in this_year


def test_agent_id_filter_keeps_the_other_filters_in_its_form(operator_client, log):
    html = operator_client.get(
        changelist(Message), {"kind__exact": "direct", "sender": "alice"}
    ).content.decode()
    assert '<input type="hidden" name="kind__exact" value="direct">' in html
    assert 'name="sender" value="alice"' in html


# --- Dead letters -------------------------------------------------------------------------------


def test_dead_letter_list_shows_only_dead_deliveries(operator_client, alice, bob, carol):
    message = broadcast(alice)
    dead = kill(message, bob)
    assert [d.pk for d in results(operator_client.get(changelist(DeadLetter)))] == [dead.pk]


def test_redeliver_action_queues_dead_letters_again(
    operator_client, alice, bob, carol, django_capture_on_commit_callbacks
):
    message = broadcast(alice)
    dead = kill(message, bob)
    with django_capture_on_commit_callbacks(execute=True):
        response = run_action(operator_client, DeadLetter, "redeliver", [dead])
    assert "Queued 1 dead letter for delivery again." in response.content.decode()
    dead.refresh_from_db()
    assert (dead.status, dead.attempts, dead.delivered_at) == ("queued", 0, None)
    frames = services.pending_frames(recipient=bob.agent, mark=False)
    assert [f["message_id"] for f in frames] == [str(message.pk)]


def test_purge_action_deletes_only_dead_letters(operator_client, alice, bob, carol):
    message = broadcast(alice)
    dead = kill(message, bob)
    response = run_action(operator_client, DeadLetter, "purge", [dead])
    assert "Purged 1 dead letter." in response.content.decode()
    assert not Delivery.objects.filter(pk=dead.pk).exists()
    assert Delivery.objects.filter(message=message, recipient=carol.agent).exists()
    event = AuditEvent.objects.get(action="dead_letters_purged")
    assert (event.actor_type, event.actor) == ("operator", "operator")


def test_dead_letter_actions_need_their_permissions(client, django_user_model, alice, bob):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", password="pw-viewer-1", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    client.force_login(viewer)
    dead = kill(send(alice, "bob"), bob)
    run_action(client, DeadLetter, "redeliver", [dead])
    run_action(client, DeadLetter, "purge", [dead])
    dead.refresh_from_db()
    assert dead.status == Delivery.Status.DEAD


# --- Subscriptions ------------------------------------------------------------------------------


def test_subscription_list_searches_by_topic_and_agent(operator_client, alice, bob):
    services.topic_subscribe(agent=alice.agent, topic="jobs.ocr")
    services.topic_subscribe(agent=bob.agent, topic="alerts")
    by_topic = results(operator_client.get(changelist(Subscription), {"q": "jobs"}))
    assert [(s.agent.agent_id, s.topic) for s in by_topic] == [("alice", "jobs.ocr")]
    by_agent = results(operator_client.get(changelist(Subscription), {"q": "bob"}))
    assert [(s.agent.agent_id, s.topic) for s in by_agent] == [("bob", "alerts")]
