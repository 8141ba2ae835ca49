"""GET contexts/{id}/versions/: the last CONTEXT_HISTORY versions, newest first."""

import pytest

from contexts.models import ContextVersion

from .conftest import detail_url, expire, if_match

pytestmark = pytest.mark.django_db


def write_versions(alice, share, as_agent, count):
    created = share(alice, payload={"n": 1}, tags=["v1"]).json()
    url = detail_url(created["context_id"])
    for n in range(2, count + 1):
        response = as_agent(alice).put(
            url, {"payload": {"n": n}, "tags": [f"v{n}"]}, format="json", headers=if_match(n - 1)
        )
        assert response.status_code == 200
    return created["context_id"]


def test_it_keeps_the_last_n_versions_current_included(alice, bob, share, as_agent, hub_settings):
    hub_settings(CONTEXT_HISTORY=3)
    context_id = write_versions(alice, share, as_agent, 5)
    response = as_agent(bob).get(f"{detail_url(context_id)}versions/")
    assert response.status_code == 200
    body = response.json()
    assert body["context_id"] == context_id
    assert body["version"] == 5
    assert [row["version"] for row in body["results"]] == [5, 4, 3]
    assert [row["payload"] for row in body["results"]] == [{"n": 5}, {"n": 4}, {"n": 3}]
    assert body["results"][1]["tags"] == ["v4"]
    # Older versions are trimmed from storage, not only hidden.
    assert sorted(ContextVersion.objects.values_list("version", flat=True)) == [3, 4]


def test_a_new_entry_has_one_version(alice, share, as_agent):
    created = share(alice).json()
    body = as_agent(alice).get(f"{detail_url(created['context_id'])}versions/").json()
    assert [row["version"] for row in body["results"]] == [1]
    assert body["results"][0]["payload"] == created["payload"]


def test_a_history_of_one_keeps_no_earlier_versions(alice, share, as_agent, hub_settings):
    hub_settings(CONTEXT_HISTORY=1)
    context_id = write_versions(alice, share, as_agent, 3)
    body = as_agent(alice).get(f"{detail_url(context_id)}versions/").json()
    assert [row["version"] for row in body["results"]] == [3]
    assert not ContextVersion.objects.exists()


def test_one_kept_version_is_readable_by_number(alice, share, as_agent, hub_settings):
    hub_settings(CONTEXT_HISTORY=2)
    context_id = write_versions(alice, share, as_agent, 3)
    kept = as_agent(alice).get(f"{detail_url(context_id)}versions/2/")
    assert kept.status_code == 200
    assert kept.json()["payload"] == {"n": 2}
    trimmed = as_agent(alice).get(f"{detail_url(context_id)}versions/1/")
    assert trimmed.status_code == 404


def test_the_history_of_an_expired_entry_answers_404(alice, share, as_agent):
    created = share(alice).json()
    expire(created["context_id"])
    response = as_agent(alice).get(f"{detail_url(created['context_id'])}versions/")
    assert response.status_code == 404
