"""Operator pages for context entries: search, filters, readable payload, history, deletion."""

import pytest
from django.urls import reverse

from contexts.models import ContextEntry

from .conftest import detail_url, expire, if_match

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:contexts_contextentry_changelist")


def change(pk):
    return reverse("admin:contexts_contextentry_change", args=[pk])


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def entries(alice, bob, share):
    made = {
        "alice_result": share(alice, context_type="task_result", tags=["job-1"], key="result"),
        "bob_error": share(bob, context_type="error", tags=["job-1", "urgent"]),
        "bob_state": share(bob, context_type="state_update", ttl_seconds=None),
    }
    return {name: response.json()["context_id"] for name, response in made.items()}


def listed(response) -> set[str]:
    assert response.status_code == 200
    return {str(entry.pk) for entry in response.context["cl"].result_list}


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, {"alice_result", "bob_error", "bob_state"}),
        ({"agent_id": "bob"}, {"bob_error", "bob_state"}),
        ({"context_type__exact": "error"}, {"bob_error"}),
        ({"tag": "job-1"}, {"alice_result", "bob_error"}),
        ({"expiry": "expired"}, {"alice_result"}),
        ({"expiry": "live"}, {"bob_error", "bob_state"}),
        ({"q": "bob"}, {"bob_error", "bob_state"}),
        ({"q": "resu"}, {"alice_result"}),
        ({"q": "urgent"}, {"bob_error"}),
    ],
)
def test_operators_find_entries_by_owner_type_tag_and_expiry(
    operator_client, entries, params, expected
):
    expire(entries["alice_result"])
    response = operator_client.get(CHANGELIST, params)
    assert listed(response) == {entries[name] for name in expected}


def test_a_context_id_finds_its_entry(operator_client, entries):
    response = operator_client.get(CHANGELIST, {"q": entries["bob_error"]})
    assert listed(response) == {entries["bob_error"]}


def test_the_entry_page_shows_a_readable_payload_and_the_history(
    operator_client, alice, share, as_agent
):
    entry = share(alice, payload={"answer": 42, "nested": {"ok": True}}).json()
    url = detail_url(entry["context_id"])
    as_agent(alice).patch(url, {"payload": {"answer": 43}}, format="json", headers=if_match(1))
    response = operator_client.get(change(entry["context_id"]))
    assert response.status_code == 200
    page = response.content.decode()
    assert "<pre" in page
    assert "&quot;answer&quot;: 43" in page  # pretty-printed, one key per line
    assert "&quot;answer&quot;: 42" in page  # version 1 in the history
    assert "earlier versions, newest first" in page


def test_entries_cannot_be_added_or_edited_in_the_admin(operator_client, entries):
    assert operator_client.get(reverse("admin:contexts_contextentry_add")).status_code == 403
    response = operator_client.post(change(entries["bob_error"]), {"context_type": "metadata"})
    assert response.status_code == 403
    assert ContextEntry.objects.get(pk=entries["bob_error"]).context_type == "error"


def test_operators_delete_entries_through_the_service(operator_client, entries):
    delete_url = reverse("admin:contexts_contextentry_delete", args=[entries["bob_error"]])
    response = operator_client.post(delete_url, {"post": "yes"})
    assert response.status_code == 302
    assert not ContextEntry.objects.filter(pk=entries["bob_error"]).exists()
    response = operator_client.post(
        CHANGELIST,
        {
            "action": "delete_selected",
            "_selected_action": [entries["alice_result"], entries["bob_state"]],
            "post": "yes",
        },
    )
    assert response.status_code == 302
    assert not ContextEntry.objects.exists()
