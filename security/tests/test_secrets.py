"""Secrets never reach a log line, the audit log or the message log: prefixes at most.

Every log record made while an agent registers, gets, refreshes and presents tokens (REST and
WebSocket, good and bad), and an operator makes keys and rotates secrets, is searched for the raw
values, as are the rendered log output and the audit log.
"""

import logging

import pytest
from channels.testing import WebsocketCommunicator
from django.urls import reverse

from agents.models import Agent
from mcp_project.asgi import application
from messaging.models import Message
from security.models import AuditEvent
from security.server import REDACTED, redact_path

from .conftest import TIMEOUT, in_db

ORIGIN = "https://console.example"


def record_text(record: logging.LogRecord) -> str:
    """Everything a handler could write for the record: message, arguments and extra fields."""
    return f"{record.getMessage()} {record.__dict__!r}"


@pytest.fixture
def every_log_record(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


async def ws_session(headers, first_frame=None) -> list[dict]:
    """Open a socket, optionally authenticate with a frame, and return what the server sent."""
    communicator = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    frames = []
    if connected:
        if first_frame is not None:
            await communicator.send_json_to(first_frame)
        output = await communicator.receive_output(TIMEOUT)
        if output["type"] == "websocket.send":
            frames.append(output)
        await communicator.disconnect()
    return frames


@pytest.mark.django_db(transaction=True)
async def test_no_secret_reaches_the_logs_or_the_audit_log(
    every_log_record, capfd, settings, api, operator_client
):
    settings.HUB = {**settings.HUB, "ALLOWED_ORIGINS": [ORIGIN]}
    client = operator_client
    # An operator makes an enrollment key in the admin; the page shows it once.
    page = await in_db(client.post)(
        reverse("admin:agents_enrollmentkey_add"), {"label": "fleet", "max_uses": "5"}
    )
    enrollment_key = page.content.decode().split('class="hub-secret">')[1].split("<")[0]
    assert enrollment_key.startswith("ek_")

    registered = await in_db(api.post)(
        "/api/v1/agents/",
        {"agent_id": "leaky", "capabilities": []},
        format="json",
        HTTP_X_ENROLLMENT_KEY=enrollment_key,
    )
    assert registered.status_code == 201
    body = registered.json()
    secret, first_access, first_refresh = body["agent_secret"], body["access"], body["refresh"]

    pair = (
        await in_db(api.post)(
            "/api/v1/auth/token/",
            {"agent_id": "leaky", "agent_secret": secret},
            format="json",
        )
    ).json()
    refreshed = (
        await in_db(api.post)(
            "/api/v1/auth/token/refresh/", {"refresh": pair["refresh"]}, format="json"
        )
    ).json()
    # Refused attempts log and audit too: a wrong secret, a reused refresh token.
    wrong_secret = secret[:-4] + "AAAA"
    assert (
        await in_db(api.post)(
            "/api/v1/auth/token/",
            {"agent_id": "leaky", "agent_secret": wrong_secret},
            format="json",
        )
    ).status_code == 401
    assert (
        await in_db(api.post)(
            "/api/v1/auth/token/refresh/", {"refresh": pair["refresh"]}, format="json"
        )
    ).status_code == 401
    # A token in a query string is not a credential here.
    assert (await in_db(api.get)(f"/api/v1/agents/?token={first_access}")).status_code == 401

    # WebSocket: a bearer header, a first frame from an allowed origin, and a bad token.
    welcome = await ws_session([(b"authorization", f"Bearer {refreshed['access']}".encode())])
    assert '"welcome"' in welcome[0]["text"]
    welcome = await ws_session(
        [(b"origin", ORIGIN.encode())], {"type": "auth", "token": first_access}
    )
    assert '"welcome"' in welcome[0]["text"]
    await ws_session([(b"authorization", f"Bearer {first_access}x".encode())])

    # The operator rotates the agent's secret; the page shows the new one once.
    agent = await in_db(Agent.objects.get)(agent_id="leaky")
    rotated = await in_db(client.post)(
        reverse("admin:agents_agent_changelist"),
        {"action": "rotate_secret", "_selected_action": [agent.pk]},
    )
    new_secret = rotated.content.decode().split('class="hub-secret">')[1].split("<")[0]
    assert new_secret and new_secret != secret

    raw_values = {
        "enrollment key": enrollment_key,
        "agent secret": secret,
        "wrong secret": wrong_secret,
        "rotated secret": new_secret,
        "access token": first_access,
        "refresh token": first_refresh,
        "second access token": pair["access"],
        "second refresh token": pair["refresh"],
        "refreshed access token": refreshed["access"],
        "refreshed refresh token": refreshed["refresh"],
    }
    records = [record_text(r) for r in every_log_record.records]
    assert len(records) > 10  # the flows above really logged
    output = "\n".join(capfd.readouterr())
    audit = await in_db(
        lambda: [f"{e.actor} {e.action} {e.target} {e.detail}" for e in AuditEvent.objects.all()]
    )()
    assert {"token_issued", "token_refreshed", "token_refresh_refused", "token_refused"} <= {
        line.split()[1] for line in audit
    }
    messages = await in_db(lambda: [repr(m.payload) for m in Message.objects.all()])()
    for name, value in raw_values.items():
        for where, texts in (
            ("log records", records),
            ("log output", [output]),
            ("audit log", audit),
            ("message log", messages),
        ):
            leaks = [text[:200] for text in texts if value in text]
            assert not leaks, f"the {name} appears in the {where}: {leaks}"
    # What the audit log names instead: key and token id prefixes.
    assert any(enrollment_key[:11] in line for line in audit)


def test_credentials_in_a_query_string_are_redacted_from_the_access_log():
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJhZ2VudF9pZCI6ImEifQ.c2lnbmF0dXJl"
    assert redact_path(f"/api/v1/agents/?token={jwt}&limit=5") == (
        f"/api/v1/agents/?token={REDACTED}&limit=5"
    )
    assert redact_path(f"/ws/agent/?q={jwt}") == f"/ws/agent/?q={REDACTED}"
    assert redact_path("/api/v1/agents/?agent_secret=s3cr3t") == (
        f"/api/v1/agents/?agent_secret={REDACTED}"
    )
    assert redact_path("/api/v1/contexts/?tag=x&limit=5") == "/api/v1/contexts/?tag=x&limit=5"
