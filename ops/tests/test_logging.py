import io
import logging

import pytest

from mcp_project.logging import config, formatter
from messaging.tasks import redeliver_due
from messaging.tests.conftest import connect, receive_type, request

pytestmark = pytest.mark.django_db(transaction=True)


def test_every_request_gets_an_id_echoed_back_and_logged_with_the_agent(as_agent, alice, json_log):
    response = as_agent(alice).get("/api/v1/agents/me/", HTTP_X_REQUEST_ID="req-42")
    assert response.status_code == 200
    assert response["X-Request-ID"] == "req-42"
    [line] = [line for line in json_log.events("request") if line["path"] == "/api/v1/agents/me/"]
    assert line["request_id"] == "req-42"
    assert line["agent_id"] == "alice"
    assert line["status"] == 200
    assert line["level"] == "info"
    assert line["duration_ms"] >= 0
    assert line["timestamp"].endswith("Z")


def test_it_replaces_a_request_id_that_could_forge_log_structure(client, json_log):
    response = client.get("/healthz", HTTP_X_REQUEST_ID='x" injected="1')
    generated = response["X-Request-ID"]
    assert generated != 'x" injected="1' and len(generated) == 32
    [line] = json_log.events("request")
    assert line["request_id"] == generated


def test_the_request_id_does_not_outlive_its_request(client, json_log):
    client.get("/healthz", HTTP_X_REQUEST_ID="short-lived")
    logging.getLogger("ops.tests").info("after the request")
    [line] = json_log.events("after the request")
    assert "request_id" not in line


def test_lines_logged_inside_a_request_carry_its_request_id(api, enrollment_key, json_log):
    response = api.post(
        "/api/v1/agents/",
        {"agent_id": "dora", "capabilities": []},
        format="json",
        HTTP_X_ENROLLMENT_KEY=enrollment_key,
        HTTP_X_REQUEST_ID="reg-1",
    )
    assert response.status_code == 201
    [registered] = json_log.events("agent registered")
    assert registered["request_id"] == "reg-1"
    assert registered["agent_id"] == "dora"


async def test_consumer_events_carry_agent_session_and_message_ids(alice, bob, json_log):
    a, welcome = await connect(alice)
    b, _ = await connect(bob)
    accepted = await request(a, {"type": "send", "to": "bob", "payload": 1, "ref": "r"})
    await receive_type(b, "message")
    await request(a, {"type": "send", "to": "nobody", "payload": 1, "ref": "bad"})
    await a.disconnect()
    await b.disconnect()

    opened = {line["agent_id"]: line for line in json_log.events("session opened")}
    assert opened["alice"]["session_id"] == welcome["session_id"]
    [sent] = json_log.events("message accepted")
    assert sent["message_id"] == accepted["message_id"]
    assert sent["agent_id"] == "alice" and sent["session_id"] == welcome["session_id"]
    assert sent["kind"] == "direct" and sent["recipients"] == 1
    [error] = json_log.events("error answered")
    assert error["code"] == "unknown_recipient" and error["ref"] == "bad"
    assert error["agent_id"] == "alice"
    closed = [line for line in json_log.events("socket closed") if line.get("agent_id") == "alice"]
    assert closed and closed[0]["close_code"] == 1000


def test_celery_task_lines_carry_the_task_name_and_id(json_log):
    result = redeliver_due.apply()
    [line] = json_log.events("task finished")
    assert line["task"] == "messaging.tasks.redeliver_due"
    assert line["task_id"] == result.id
    assert line["state"] == "SUCCESS"
    assert line["result"] == {"dead": 0, "replayed_recipients": 0}


def test_console_format_is_one_readable_line_per_event():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("console"))
    logger = logging.getLogger("ops.tests.console")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("disk nearly full", extra={"free_mb": 12})
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue().strip()
    assert "disk nearly full" in line and "free_mb=12" in line and "warning" in line
    assert not line.startswith("{")


def test_an_unknown_log_format_fails_loudly():
    with pytest.raises(ValueError, match="HUB_LOG_FORMAT"):
        config(level="INFO", fmt="xml")
