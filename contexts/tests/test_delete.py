"""DELETE contexts/{id}/: the owner or an operator."""

import uuid

import pytest

from contexts.models import ContextEntry, ContextTag, ContextVersion

from .conftest import detail_url, expire, if_match

pytestmark = pytest.mark.django_db


def test_the_owner_deletes_an_entry_with_its_tags_and_history(alice, share, as_agent):
    created = share(alice, tags=["t"]).json()
    url = detail_url(created["context_id"])
    as_agent(alice).patch(url, {"payload": {"v": 2}}, format="json", headers=if_match(1))
    response = as_agent(alice).delete(url)
    assert response.status_code == 204
    assert as_agent(alice).get(url).status_code == 404
    assert not ContextEntry.objects.exists()
    assert not ContextTag.objects.exists()
    assert not ContextVersion.objects.exists()


def test_another_agent_may_not_delete(alice, bob, share, as_agent):
    created = share(alice).json()
    response = as_agent(bob).delete(detail_url(created["context_id"]))
    assert response.status_code == 403
    assert ContextEntry.objects.filter(pk=created["context_id"]).exists()


def test_an_operator_may_delete(alice, share, api, operator_tokens):
    created = share(alice).json()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}")
    assert api.delete(detail_url(created["context_id"])).status_code == 204
    assert not ContextEntry.objects.exists()


def test_deleting_an_unknown_entry_answers_404(alice, as_agent):
    assert as_agent(alice).delete(detail_url(uuid.uuid4())).status_code == 404


def test_deleting_an_expired_entry_answers_404(alice, share, as_agent):
    created = share(alice).json()
    expire(created["context_id"])
    assert as_agent(alice).delete(detail_url(created["context_id"])).status_code == 404


def test_a_delete_with_a_stale_if_match_answers_412(alice, share, as_agent):
    created = share(alice).json()
    url = detail_url(created["context_id"])
    as_agent(alice).patch(url, {"payload": {}}, format="json", headers=if_match(1))
    response = as_agent(alice).delete(url, headers=if_match(1))
    assert response.status_code == 412
    assert response.json()["current_version"] == 2
    assert as_agent(alice).delete(url, headers=if_match(2)).status_code == 204
