import pytest
from channels.testing import WebsocketCommunicator
from django.urls import reverse

from agents.models import Agent
from agents.throttles import RegisterThrottle, SendThrottle, TokenThrottle
from mcp_project.asgi import application
from messaging.consumers import AgentConsumer
from messaging.models import Message

TIMEOUT = 5


def hub_settings(settings, **changes):
    return {**settings.HUB, **changes}


@pytest.fixture(autouse=True)
def fresh_buckets():
    AgentConsumer._buckets.clear()
    yield
    AgentConsumer._buckets.clear()


async def connect(credentials):
    ws = WebsocketCommunicator(application, "/ws/agent/", headers=credentials.ws_headers)
    connected, _ = await ws.connect(timeout=TIMEOUT)
    assert connected
    return ws


@pytest.mark.django_db(transaction=True)
async def test_it_answers_rate_limited_with_retry_after_past_the_burst(settings, alice):
    settings.HUB = hub_settings(settings, WS_RATE=1, WS_BURST=3, WS_ABUSE_LIMIT=100)
    ws = await connect(alice)
    assert (await ws.receive_json_from(TIMEOUT))["type"] == "welcome"
    for i in range(3):
        await ws.send_json_to({"type": "heartbeat", "ref": f"h{i}"})
        assert (await ws.receive_json_from(TIMEOUT))["type"] == "heartbeat_ack"
    await ws.send_json_to({"type": "heartbeat", "ref": "over"})
    refused = await ws.receive_json_from(TIMEOUT)
    assert refused["code"] == "rate_limited" and refused["ref"] == "over"
    assert 0 < refused["retry_after"] <= 1
    await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_it_closes_with_4429_when_the_limit_is_abused(settings, alice):
    settings.HUB = hub_settings(settings, WS_RATE=1, WS_BURST=1, WS_ABUSE_LIMIT=5)
    ws = await connect(alice)
    await ws.receive_json_from(TIMEOUT)
    for _ in range(10):
        await ws.send_json_to({"type": "heartbeat"})
    frames = []
    while True:
        output = await ws.receive_output(TIMEOUT)
        if output["type"] == "websocket.close":
            break
        frames.append(output)
    assert output["code"] == 4429
    assert len(frames) == 6  # one ack, four refusals, then the closing error


@pytest.mark.django_db(transaction=True)
async def test_it_refuses_a_connection_over_the_per_agent_limit_with_4409(settings, alice):
    settings.HUB = hub_settings(settings, MAX_CONNECTIONS_PER_AGENT=2)
    first, second = await connect(alice), await connect(alice)
    for ws in (first, second):
        assert (await ws.receive_json_from(TIMEOUT))["type"] == "welcome"
    third = await connect(alice)
    error = await third.receive_json_from(TIMEOUT)
    assert error["type"] == "error"
    closed = await third.receive_output(TIMEOUT)
    assert closed == {"type": "websocket.close", "code": 4409}
    await first.disconnect()
    await second.disconnect()


@pytest.mark.django_db
def test_rest_registration_is_throttled_with_retry_after(api, enrollment_key, monkeypatch):
    monkeypatch.setattr(
        RegisterThrottle, "THROTTLE_RATES", {**RegisterThrottle.THROTTLE_RATES, "register": "2/min"}
    )

    def register(agent_id):
        return api.post(
            "/api/v1/agents/",
            {"agent_id": agent_id},
            format="json",
            HTTP_X_ENROLLMENT_KEY=enrollment_key,
        )

    assert [register(f"agent-{i}").status_code for i in range(2)] == [201, 201]
    refused = register("agent-x")
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) > 0
    assert refused.json()["code"] == "throttled"
    assert not Agent.objects.filter(agent_id="agent-x").exists()


@pytest.mark.django_db
def test_rest_token_and_refresh_calls_share_a_throttle_with_retry_after(api, alice, monkeypatch):
    monkeypatch.setattr(
        TokenThrottle, "THROTTLE_RATES", {**TokenThrottle.THROTTLE_RATES, "token": "2/min"}
    )
    credentials = {"agent_id": "alice", "agent_secret": alice.secret}
    assert api.post("/api/v1/auth/token/", credentials, format="json").status_code == 200
    refresh = {"refresh": alice.refresh}
    assert api.post("/api/v1/auth/token/refresh/", refresh, format="json").status_code == 200
    for path, body in (("/api/v1/auth/token/", credentials), ("/api/v1/auth/token/refresh/", {})):
        refused = api.post(path, body, format="json")
        assert refused.status_code == 429
        assert int(refused["Retry-After"]) > 0 and refused.json()["code"] == "throttled"


@pytest.mark.django_db
def test_rest_sends_are_throttled_per_agent(as_agent, alice, bob, monkeypatch):
    monkeypatch.setattr(
        SendThrottle, "THROTTLE_RATES", {**SendThrottle.THROTTLE_RATES, "send": "2/min"}
    )

    def send(sender, n):
        body = {"to": "bob" if sender is alice else "alice", "payload": {"n": n}}
        return as_agent(sender).post("/api/v1/messages/", body, format="json")

    assert [send(alice, n).status_code for n in range(2)] == [201, 201]
    refused = send(alice, 2)
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert Message.objects.filter(sender=alice.agent).count() == 2
    # Another agent behind the same address has its own allowance.
    assert send(bob, 0).status_code == 201


@pytest.mark.django_db
def test_admin_login_locks_out_after_repeated_failures(client, operator, settings):
    settings.AXES_FAILURE_LIMIT = 3
    url = reverse("admin:login")
    for _ in range(3):
        client.post(url, {"username": "operator", "password": "wrong"})
    locked = client.post(url, {"username": "operator", "password": "op-password-1"})
    assert locked.status_code == 429
