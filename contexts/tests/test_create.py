"""POST contexts/: sharing entries, keyed upserts, TTL rules and refusals."""

from datetime import timedelta

import pytest
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from contexts import services
from contexts.models import ContextEntry, ContextTag

from .conftest import URL, detail_url, expire, if_match

pytestmark = pytest.mark.django_db


def test_it_creates_an_entry_owned_by_the_caller(alice, share):
    response = share(
        alice,
        context_type="state_update",
        payload={"step": 3},
        tags=["job-7", "env:prod"],
        agent_id="bob",  # not an input: the owner is always the caller
    )
    body = response.json()
    assert response["ETag"] == '"1"'
    assert response["Location"] == detail_url(body["context_id"])
    assert body["agent_id"] == "alice"
    assert body["version"] == 1
    assert body["context_type"] == "state_update"
    assert body["payload"] == {"step": 3}
    assert body["tags"] == ["job-7", "env:prod"]
    assert body["key"] is None
    entry = ContextEntry.objects.get(pk=body["context_id"])
    assert entry.owner == alice.agent
    rows = ContextTag.objects.filter(entry=entry)
    assert set(rows.values_list("tag", "context_type", "updated_at", "expires_at")) == {
        (tag, "state_update", entry.updated_at, entry.expires_at) for tag in ("job-7", "env:prod")
    }


def test_it_applies_the_default_ttl(alice, share, hub_settings):
    hub_settings(CONTEXT_DEFAULT_TTL=120)
    body = share(alice).json()
    assert body["ttl_seconds"] == 120
    lifetime = parse_datetime(body["expires_at"]) - parse_datetime(body["created_at"])
    assert lifetime == timedelta(seconds=120)


def test_a_null_ttl_lives_to_the_operator_maximum(alice, share, hub_settings):
    hub_settings(CONTEXT_MAX_TTL=7200)
    body = share(alice, ttl_seconds=None).json()
    assert body["ttl_seconds"] is None
    lifetime = parse_datetime(body["expires_at"]) - parse_datetime(body["created_at"])
    assert lifetime == timedelta(seconds=7200)


def test_a_null_ttl_never_expires_when_the_operator_sets_no_maximum(alice, share, hub_settings):
    hub_settings(CONTEXT_MAX_TTL=0)
    body = share(alice, ttl_seconds=None).json()
    assert body["expires_at"] is None


def test_it_refuses_a_ttl_over_the_operator_maximum(alice, share, hub_settings):
    hub_settings(CONTEXT_MAX_TTL=600)
    body = share(alice, expect=400, ttl_seconds=601).json()
    assert "ttl_seconds" in body["errors"]
    assert "600" in body["errors"]["ttl_seconds"][0]


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"context_type": "gossip"}, "context_type"),
        ({"payload": None}, "payload"),
        ({"tags": ["has space"]}, "tags"),
        ({"tags": "not-a-list"}, "tags"),
        ({"tags": [f"t{i}" for i in range(21)]}, "tags"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": "soon"}, "ttl_seconds"),
        ({"key": "../etc"}, "key"),
        ({"key": "k" * 201}, "key"),
    ],
)
def test_validation_errors_name_the_field(alice, share, fields, field):
    body = share(alice, expect=400, **fields).json()
    assert body["code"] == "invalid"
    assert field in body["errors"], body


def test_it_refuses_a_missing_payload(alice, as_agent):
    response = as_agent(alice).post(URL, {"context_type": "error"}, format="json")
    assert response.status_code == 400
    assert "payload" in response.json()["errors"]


def test_it_refuses_a_payload_over_the_limit_with_413(alice, share, hub_settings):
    hub_settings(MAX_PAYLOAD_BYTES=1024)
    body = share(alice, expect=413, payload={"blob": "x" * 1100}).json()
    assert body["code"] == "payload_too_large"
    assert not ContextEntry.objects.exists()


def test_it_refuses_a_body_over_the_request_limit_before_parsing(alice, as_agent, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    body = {"context_type": "error", "payload": {"blob": "x" * 4096}}
    response = as_agent(alice).post(URL, body, format="json")
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


def test_it_refuses_numbers_the_change_stream_could_not_carry(alice):
    # The REST parser reads such numbers as floats; other callers of the service could pass them.
    with pytest.raises(services.ContextInvalid) as caught:
        services.context_create(owner=alice.agent, context_type="metadata", payload={"n": 2**70})
    assert caught.value.detail.startswith("payload:")
    assert not ContextEntry.objects.exists()


def test_operators_cannot_create_entries(api, operator_tokens):
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}")
    response = api.post(URL, {"context_type": "error", "payload": {}}, format="json")
    assert response.status_code == 403


def test_it_refuses_anonymous_callers(api):
    response = api.post(URL, {"context_type": "error", "payload": {}}, format="json")
    assert response.status_code == 401


# --- Keyed upserts ------------------------------------------------------------------------------


def test_a_keyed_post_creates_then_updates_the_same_entry(alice, share):
    first = share(alice, key="status", payload={"phase": "boot"}, context_type="state_update")
    second = share(
        alice, expect=200, key="status", payload={"phase": "run"}, context_type="state_update"
    )
    assert second.json()["context_id"] == first.json()["context_id"]
    assert second.json()["version"] == 2
    assert second["ETag"] == '"2"'
    assert second.json()["payload"] == {"phase": "run"}


def test_keys_are_unique_per_owner_not_globally(alice, bob, share):
    a = share(alice, key="status").json()
    b = share(bob, key="status").json()
    assert a["context_id"] != b["context_id"]
    assert a["agent_id"] == "alice" and b["agent_id"] == "bob"


def test_a_keyed_post_with_if_none_match_star_only_creates(alice, share):
    share(alice, key="lock", headers={"If-None-Match": "*"})
    body = share(alice, expect=412, key="lock", headers={"If-None-Match": "*"}).json()
    assert body["code"] == "version_mismatch"
    assert body["current_version"] == 1


def test_a_keyed_post_with_if_match_updates_only_that_version(alice, share):
    share(alice, key="k")
    share(alice, expect=200, key="k", headers=if_match(1))
    body = share(alice, expect=412, key="k", headers=if_match(1)).json()
    assert body["current_version"] == 2


def test_a_keyed_post_with_if_match_needs_an_existing_entry(alice, share):
    body = share(alice, expect=412, key="absent", headers=if_match(1)).json()
    assert body["current_version"] is None


def test_if_match_on_a_post_without_key_is_refused(alice, share):
    body = share(alice, expect=400, headers=if_match(1)).json()
    assert "key" in body["errors"]


def test_a_key_cannot_change_its_entrys_type(alice, share):
    share(alice, key="k", context_type="state_update")
    body = share(alice, expect=409, key="k", context_type="error").json()
    assert body["code"] == "conflict"


def test_an_expired_keyed_entry_gives_way_to_a_new_one(alice, share):
    old = share(alice, key="status").json()
    expire(old["context_id"])
    new = share(alice, key="status", payload={"fresh": True}).json()
    assert new["context_id"] != old["context_id"]
    assert new["version"] == 1
    assert not ContextEntry.objects.filter(pk=old["context_id"]).exists()


def test_a_keyed_upsert_renews_the_expiry(alice, share):
    first = share(alice, key="status", ttl_seconds=60).json()
    ContextEntry.objects.filter(pk=first["context_id"]).update(
        expires_at=timezone.now() + timedelta(seconds=5)
    )
    second = share(alice, expect=200, key="status", ttl_seconds=60).json()
    assert parse_datetime(second["expires_at"]) > timezone.now() + timedelta(seconds=50)
