"""Every read, query, write and watch asks context_access_check, the hook for access policies."""

import pytest

from contexts import services

from .conftest import URL, connect, context_frames, detail_url, if_match, in_db, request, watch


def bob_may_not_touch_errors_policy(*, agent, context_type, action):
    """A policy: bob may neither read nor write error entries."""
    return not (agent is not None and agent.agent_id == "bob" and context_type == "error")


@pytest.fixture
def bob_may_not_touch_errors(monkeypatch):
    """Install the policy at the hook for the whole test."""
    monkeypatch.setattr(services, "context_access_check", bob_may_not_touch_errors_policy)


@pytest.mark.django_db
def test_the_hook_allows_everything_by_default(alice):
    for context_type in ("task_result", "state_update", "error", "metadata"):
        for action in ("read", "write"):
            assert services.context_access_check(
                agent=alice.agent, context_type=context_type, action=action
            )


@pytest.mark.django_db
@pytest.mark.usefixtures("bob_may_not_touch_errors")
class TestARefusingPolicy:
    def test_it_refuses_the_write(self, bob, share):
        body = share(bob, expect=403, context_type="error").json()
        assert body["code"] == "forbidden"
        share(bob, context_type="metadata")

    def test_it_refuses_the_read(self, alice, bob, share, as_agent):
        entry = share(alice, context_type="error").json()
        assert as_agent(bob).get(detail_url(entry["context_id"])).status_code == 403
        assert as_agent(bob).get(f"{detail_url(entry['context_id'])}versions/").status_code == 403
        assert as_agent(alice).get(detail_url(entry["context_id"])).status_code == 200

    def test_queries_leave_out_unreadable_types(self, alice, bob, share, as_agent):
        share(alice, context_type="error")
        kept = share(alice, context_type="metadata").json()
        body = as_agent(bob).get(URL).json()
        assert [row["context_id"] for row in body["results"]] == [kept["context_id"]]
        assert body["count"] == 1
        assert as_agent(bob).get(URL, {"context_type": "error"}).status_code == 403


@pytest.mark.django_db
def test_a_policy_applies_to_entries_written_before_it(bob, share, as_agent, monkeypatch):
    entry = share(bob, context_type="error").json()
    monkeypatch.setattr(services, "context_access_check", bob_may_not_touch_errors_policy)
    url = detail_url(entry["context_id"])
    response = as_agent(bob).patch(url, {"payload": {}}, format="json", headers=if_match(1))
    assert response.status_code == 403
    assert as_agent(bob).delete(url).status_code == 403


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("bob_may_not_touch_errors", "release_db_connections")
async def test_a_watch_for_an_unreadable_type_is_refused_and_others_skip_it(alice, bob, share):
    socket = await connect(bob)
    answer = await request(socket, {"type": "watch", "context_type": "error", "ref": "e"})
    assert answer["type"] == "error" and answer["code"] == "forbidden" and answer["ref"] == "e"
    await watch(socket)
    await in_db(share)(alice, context_type="error")
    visible = (await in_db(share)(alice, context_type="metadata")).json()
    (frame,) = await context_frames(socket, 1)
    assert frame["entry"]["context_id"] == visible["context_id"]
    await socket.disconnect()
