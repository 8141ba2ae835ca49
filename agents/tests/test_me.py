"""/api/v1/agents/me/ and its heartbeat: an agent reads, changes and retires itself."""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone
from rest_framework.test import APIClient

from agents import live, services
from agents.models import Agent, Capability, IssuedToken

ME = "/api/v1/agents/me/"
HEARTBEAT = "/api/v1/agents/me/heartbeat/"


async def read_one(layer, channel):
    return await asyncio.wait_for(layer.receive(channel), 2.0)


def bearer(token: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


# --- GET ----------------------------------------------------------------------------------------


def test_it_reads_the_callers_own_profile(as_agent, alice, bob):
    response = as_agent(alice).get(ME)
    assert response.status_code == 200
    body = response.json()
    assert body["agent_id"] == "alice" and body["name"] == "Alice"
    assert [cap["name"] for cap in body["capabilities"]] == ["ocr", "summarize"]
    assert body["state"] == "active"


def test_me_is_for_agents_not_operators(operator_tokens):
    response = APIClient().get(ME, **bearer(operator_tokens["access"]))
    assert response.status_code == 403


# --- PATCH --------------------------------------------------------------------------------------


def test_it_changes_only_the_fields_sent(as_agent, alice):
    response = as_agent(alice).patch(ME, {"description": "Reads and condenses."}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["description"] == "Reads and condenses."
    assert body["name"] == "Alice"
    assert [cap["name"] for cap in body["capabilities"]] == ["ocr", "summarize"]
    alice.agent.refresh_from_db()
    assert alice.agent.description == "Reads and condenses."


def test_it_replaces_the_capabilities_whole(as_agent, alice):
    response = as_agent(alice).patch(
        ME,
        {"capabilities": [{"name": "translate", "version": "3"}, {"name": "ocr"}]},
        format="json",
    )
    assert response.status_code == 200
    assert response.json()["capabilities"] == [
        {"name": "ocr", "version": "", "description": ""},
        {"name": "translate", "version": "3", "description": ""},
    ]
    names = Capability.objects.filter(agent=alice.agent).values_list("name", flat=True)
    assert sorted(names) == ["ocr", "translate"]


def test_it_clears_the_capabilities_with_an_empty_list(as_agent, alice):
    response = as_agent(alice).patch(ME, {"capabilities": []}, format="json")
    assert response.json()["capabilities"] == []
    assert not Capability.objects.filter(agent=alice.agent).exists()


def test_it_replaces_metadata_rather_than_merging_it(as_agent, alice):
    client = as_agent(alice)
    client.patch(ME, {"metadata": {"region": "eu", "tier": 1}}, format="json")
    response = client.patch(ME, {"metadata": {"tier": 2}}, format="json")
    assert response.json()["metadata"] == {"tier": 2}


def test_a_changed_capability_is_what_discovery_finds(as_agent, alice, bob):
    as_agent(alice).patch(ME, {"capabilities": [{"name": "translate"}]}, format="json")
    found = as_agent(bob).get("/api/v1/agents/", {"capability": "translate"}).json()["results"]
    assert [profile["agent_id"] for profile in found] == ["alice"]
    ocr = as_agent(bob).get("/api/v1/agents/", {"capability": "ocr"}).json()["results"]
    assert ocr == []


def test_it_does_not_let_an_agent_rename_or_reactivate_itself(as_agent, alice):
    response = as_agent(alice).patch(
        ME, {"agent_id": "mallory", "state": "disabled", "secret_digest": "0" * 64}, format="json"
    )
    assert response.status_code == 200
    alice.agent.refresh_from_db()
    assert alice.agent.agent_id == "alice" and alice.agent.state == "active"
    assert alice.agent.check_secret(alice.secret)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "n" * 201}, "name"),
        ({"name": None}, "name"),
        ({"description": "d" * 5001}, "description"),
        ({"metadata": "text"}, "metadata"),
        ({"metadata": None}, "metadata"),
        ({"capabilities": [{"name": "ocr"}, {"name": "ocr"}]}, "capabilities"),
        ({"capabilities": [{"name": "no spaces"}]}, "capabilities"),
        ({"capabilities": [{"version": "1"}]}, "capabilities"),
        ({"capabilities": None}, "capabilities"),
        ({"capabilities": [{"name": f"c{n}"} for n in range(101)]}, "capabilities"),
    ],
)
def test_it_refuses_invalid_changes_naming_the_field(as_agent, alice, body, field):
    response = as_agent(alice).patch(ME, body, format="json")
    assert response.status_code == 400
    assert field in response.json()["errors"]
    # Nothing was half-applied.
    alice.agent.refresh_from_db()
    assert alice.agent.name == "Alice"
    assert Capability.objects.filter(agent=alice.agent).count() == 2


def test_an_empty_patch_changes_nothing(as_agent, alice):
    before = as_agent(alice).get(ME).json()
    response = as_agent(alice).patch(ME, {}, format="json")
    assert response.status_code == 200
    assert response.json()["capabilities"] == before["capabilities"]


# --- DELETE -------------------------------------------------------------------------------------


def test_deregistering_answers_204_and_keeps_the_history(as_agent, alice):
    response = as_agent(alice).delete(ME)
    assert response.status_code == 204
    assert response.content == b""
    agent = Agent.objects.get(agent_id="alice")
    assert agent.state == Agent.State.DEREGISTERED
    # The row, its capabilities and its token records stay for the record.
    assert Capability.objects.filter(agent=agent).count() == 2
    assert IssuedToken.objects.filter(agent=agent).count() == 2


def test_deregistering_revokes_every_token(as_agent, alice):
    second = services.tokens_issue(agent=alice.agent)
    as_agent(alice).delete(ME)
    assert not IssuedToken.objects.filter(agent=alice.agent, revoked_at__isnull=True).exists()
    for token in (alice.access, second["access"]):
        response = APIClient().get(ME, **bearer(token))
        assert response.status_code == 401
    refresh = APIClient().post(
        "/api/v1/auth/token/refresh/", {"refresh": second["refresh"]}, format="json"
    )
    assert refresh.status_code == 401
    obtain = APIClient().post(
        "/api/v1/auth/token/", {"agent_id": "alice", "agent_secret": alice.secret}, format="json"
    )
    assert obtain.status_code == 401


def test_a_deregistered_agent_leaves_discovery(as_agent, alice, bob):
    as_agent(alice).delete(ME)
    listed = as_agent(bob).get("/api/v1/agents/").json()
    assert [profile["agent_id"] for profile in listed["results"]] == ["bob"]
    assert as_agent(bob).get("/api/v1/agents/alice/").status_code == 404


def test_deregistering_twice_answers_401_the_second_time(as_agent, alice):
    client = as_agent(alice)
    assert client.delete(ME).status_code == 204
    assert client.delete(ME).status_code == 401


def test_deregistering_closes_live_sockets_with_4403(
    as_agent, alice, django_capture_on_commit_callbacks
):
    # A socket of alice's is a member of her agent group; it hears the close once the change
    # commits.
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(live.agent_group(alice.agent.pk), channel)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            assert as_agent(alice).delete(ME).status_code == 204
        event = async_to_sync(read_one)(layer, channel)
        assert event == {"type": "hub.close", "code": 4403}
    finally:
        async_to_sync(layer.group_discard)(live.agent_group(alice.agent.pk), channel)


# --- Heartbeat ----------------------------------------------------------------------------------


def test_a_heartbeat_records_a_sign_of_life(as_agent, alice):
    Agent.objects.filter(pk=alice.agent.pk).update(last_seen_at=timezone.now() - timedelta(hours=1))
    before = timezone.now()
    response = as_agent(alice).post(HEARTBEAT)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"status", "last_seen_at"}
    assert body["status"] == "online"
    alice.agent.refresh_from_db()
    assert alice.agent.last_seen_at >= before
    assert body["last_seen_at"].startswith(alice.agent.last_seen_at.strftime("%Y-%m-%dT%H:%M:%S"))


def test_a_heartbeat_brings_an_agent_online_in_discovery(as_agent, alice, bob):
    Agent.objects.update(last_seen_at=timezone.now() - timedelta(hours=1))
    as_agent(alice).post(HEARTBEAT)
    online = as_agent(bob).get("/api/v1/agents/", {"status": "online"}).json()["results"]
    assert [profile["agent_id"] for profile in online] == ["alice"]


def test_a_heartbeat_ignores_any_body(as_agent, alice):
    response = as_agent(alice).post(HEARTBEAT, {"status": "offline"}, format="json")
    assert response.status_code == 200 and response.json()["status"] == "online"


def test_heartbeats_are_for_agents(operator_tokens):
    response = APIClient().post(HEARTBEAT, **bearer(operator_tokens["access"]))
    assert response.status_code == 403


def test_a_heartbeat_only_takes_post(as_agent, alice):
    assert as_agent(alice).get(HEARTBEAT).status_code == 405
