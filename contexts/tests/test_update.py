"""PUT and PATCH contexts/{id}/: owner-only writes guarded by If-Match."""

from datetime import timedelta

import pytest
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from contexts.models import ContextEntry, ContextTag

from .conftest import detail_url, expire, if_match

pytestmark = pytest.mark.django_db


@pytest.fixture
def entry(alice, share):
    return share(
        alice,
        context_type="state_update",
        payload={"a": 1, "b": 2},
        tags=["old", "kept"],
        ttl_seconds=600,
    ).json()


def test_put_replaces_payload_tags_and_ttl_as_a_new_version(alice, entry, as_agent, hub_settings):
    hub_settings(CONTEXT_DEFAULT_TTL=900)
    response = as_agent(alice).put(
        detail_url(entry["context_id"]), {"payload": {"c": 3}}, format="json", headers=if_match(1)
    )
    assert response.status_code == 200, response.json()
    body = response.json()
    assert response["ETag"] == '"2"'
    assert body["version"] == 2
    assert body["payload"] == {"c": 3}
    assert body["tags"] == []  # a full replace: omitted tags are cleared
    assert body["ttl_seconds"] == 900  # and an omitted ttl is the default again
    assert body["created_at"] == entry["created_at"]
    assert parse_datetime(body["updated_at"]) > parse_datetime(entry["updated_at"])


def test_patch_changes_only_the_fields_given(alice, entry, as_agent):
    response = as_agent(alice).patch(
        detail_url(entry["context_id"]), {"tags": ["new"]}, format="json", headers=if_match(1)
    )
    assert response.status_code == 200
    body = response.json()
    assert body["payload"] == {"a": 1, "b": 2}
    assert body["tags"] == ["new"]
    assert body["ttl_seconds"] == 600
    assert body["version"] == 2


def test_every_write_renews_the_expiry(alice, entry, as_agent):
    ContextEntry.objects.filter(pk=entry["context_id"]).update(
        expires_at=timezone.now() + timedelta(seconds=5)
    )
    body = (
        as_agent(alice)
        .patch(detail_url(entry["context_id"]), {"payload": {}}, format="json", headers=if_match(1))
        .json()
    )
    assert parse_datetime(body["expires_at"]) > timezone.now() + timedelta(seconds=590)


def test_a_write_keeps_the_tag_index_in_step(alice, entry, as_agent):
    as_agent(alice).patch(
        detail_url(entry["context_id"]),
        {"tags": ["kept", "new"]},
        format="json",
        headers=if_match(1),
    )
    rows = ContextTag.objects.filter(entry_id=entry["context_id"])
    assert sorted(rows.values_list("tag", flat=True)) == ["kept", "new"]
    written = ContextEntry.objects.get(pk=entry["context_id"])
    copies = set(rows.values_list("context_type", "updated_at", "expires_at"))
    assert copies == {(written.context_type, written.updated_at, written.expires_at)}


@pytest.mark.parametrize("method", ["put", "patch"])
def test_a_write_without_if_match_answers_428(alice, entry, as_agent, method):
    response = getattr(as_agent(alice), method)(
        detail_url(entry["context_id"]), {"payload": {}}, format="json"
    )
    assert response.status_code == 428
    assert response.json()["code"] == "precondition_required"
    assert ContextEntry.objects.get(pk=entry["context_id"]).version == 1


@pytest.mark.parametrize("method", ["put", "patch"])
def test_a_stale_if_match_answers_412_naming_the_current_version(alice, entry, as_agent, method):
    url = detail_url(entry["context_id"])
    as_agent(alice).patch(url, {"payload": {"v": 2}}, format="json", headers=if_match(1))
    response = getattr(as_agent(alice), method)(
        url, {"payload": {"v": 3}}, format="json", headers=if_match(1)
    )
    assert response.status_code == 412
    body = response.json()
    assert body["code"] == "version_mismatch"
    assert body["current_version"] == 2
    assert response["ETag"] == '"2"'
    assert ContextEntry.objects.get(pk=entry["context_id"]).payload == {"v": 2}


@pytest.mark.parametrize("header", ['"1"', "1", 'W/"1"', "*", ' "1" '])
def test_if_match_accepts_the_version_in_its_usual_forms(alice, entry, as_agent, header):
    response = as_agent(alice).patch(
        detail_url(entry["context_id"]),
        {"payload": {}},
        format="json",
        headers={"If-Match": header},
    )
    assert response.status_code == 200


@pytest.mark.parametrize("header", ["abc", '"1", "2"', '"-1"', ""])
def test_a_malformed_if_match_answers_400(alice, entry, as_agent, header):
    response = as_agent(alice).patch(
        detail_url(entry["context_id"]),
        {"payload": {}},
        format="json",
        headers={"If-Match": header},
    )
    assert response.status_code == 400
    assert "If-Match" in response.json()["errors"]


def test_only_the_owner_may_write(bob, entry, as_agent):
    response = as_agent(bob).patch(
        detail_url(entry["context_id"]), {"payload": {}}, format="json", headers=if_match(1)
    )
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"


def test_a_non_owner_hears_403_before_428(bob, entry, as_agent):
    response = as_agent(bob).patch(detail_url(entry["context_id"]), {"payload": {}}, format="json")
    assert response.status_code == 403


def test_operators_may_not_write(entry, api, operator_tokens):
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}")
    response = api.patch(
        detail_url(entry["context_id"]), {"payload": {}}, format="json", headers=if_match(1)
    )
    assert response.status_code == 403


def test_an_expired_entry_cannot_be_written(alice, entry, as_agent):
    expire(entry["context_id"])
    response = as_agent(alice).patch(
        detail_url(entry["context_id"]), {"payload": {}}, format="json", headers=if_match(1)
    )
    assert response.status_code == 404


def test_the_type_of_an_entry_never_changes(alice, entry, as_agent):
    url = detail_url(entry["context_id"])
    changed = as_agent(alice).put(
        url, {"payload": {}, "context_type": "error"}, format="json", headers=if_match(1)
    )
    assert changed.status_code == 400
    assert changed.json()["detail"].startswith("context_type:")
    repeated = as_agent(alice).put(
        url, {"payload": {}, "context_type": "state_update"}, format="json", headers=if_match(1)
    )
    assert repeated.status_code == 200


def test_an_empty_patch_is_refused(alice, entry, as_agent):
    response = as_agent(alice).patch(
        detail_url(entry["context_id"]), {}, format="json", headers=if_match(1)
    )
    assert response.status_code == 400


def test_an_update_over_the_payload_limit_answers_413(alice, entry, as_agent, hub_settings):
    hub_settings(MAX_PAYLOAD_BYTES=1024)
    response = as_agent(alice).patch(
        detail_url(entry["context_id"]),
        {"payload": "x" * 2000},
        format="json",
        headers=if_match(1),
    )
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
