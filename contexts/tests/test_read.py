"""GET contexts/{id}/: one entry with its version as ETag; expired entries are gone at once."""

import uuid

import pytest

from contexts.serializers import ContextEntrySerializer

from .conftest import detail_url, expire

pytestmark = pytest.mark.django_db


def test_it_answers_the_entry_with_its_version_as_etag(alice, bob, share, as_agent):
    created = share(alice, payload={"rows": [1, 2]}, tags=["a"]).json()
    response = as_agent(bob).get(detail_url(created["context_id"]))
    assert response.status_code == 200
    assert response["ETag"] == '"1"'
    assert response.json() == created


def test_operators_may_read_entries(alice, share, api, operator_tokens):
    created = share(alice).json()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}")
    assert api.get(detail_url(created["context_id"])).status_code == 200


def test_it_answers_404_for_an_unknown_entry(alice, as_agent):
    response = as_agent(alice).get(detail_url(uuid.uuid4()))
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_it_answers_a_json_404_for_a_malformed_id(alice, as_agent):
    response = as_agent(alice).get(detail_url("not-a-uuid"))
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_an_expired_entry_answers_404_before_any_purge(alice, share, as_agent):
    created = share(alice).json()
    expire(created["context_id"])
    response = as_agent(alice).get(detail_url(created["context_id"]))
    assert response.status_code == 404


def test_an_entry_is_readable_until_its_expiry(alice, share, as_agent):
    created = share(alice).json()
    expire(created["context_id"], seconds_ago=-30)  # 30 seconds in the future
    assert as_agent(alice).get(detail_url(created["context_id"])).status_code == 200


def test_if_none_match_with_the_current_version_answers_304(alice, share, as_agent):
    created = share(alice).json()
    url = detail_url(created["context_id"])
    not_modified = as_agent(alice).get(url, headers={"If-None-Match": '"1"'})
    assert not_modified.status_code == 304
    assert not_modified["ETag"] == '"1"'
    stale = as_agent(alice).get(url, headers={"If-None-Match": '"7"'})
    assert stale.status_code == 200


def test_it_refuses_anonymous_readers(alice, share, api):
    created = share(alice).json()
    assert api.get(detail_url(created["context_id"])).status_code == 401


def test_the_documented_schema_names_every_field_an_entry_shows(alice, share):
    shown = share(alice).json()
    assert set(ContextEntrySerializer().fields) == set(shown)
