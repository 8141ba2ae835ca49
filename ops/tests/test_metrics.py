from datetime import timedelta

import pytest
from django.core.cache import cache
from django.utils import timezone

from agents.throttles import TokenThrottle
from messaging import services as messaging_services
from messaging.models import Delivery
from messaging.tasks import expire_deliveries, redeliver_due
from messaging.tests.conftest import connect, receive_type, request

pytestmark = pytest.mark.django_db(transaction=True)


def scrape(client, **headers) -> str:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return response.content.decode()


def sample(text: str, line_start: str) -> float:
    """Return the value of the first exposition line that starts with `line_start`."""
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_start!r} in /metrics")


async def test_it_counts_sockets_frames_deliveries_and_latency_of_a_real_exchange(
    alice, bob, samples
):
    for name, labels in [
        ("hub_ws_connects_total", {}),
        ("hub_ws_sessions_total", {}),
        ("hub_ws_frames_in_total", {"type": "send"}),
        ("hub_ws_frames_out_total", {"type": "accepted"}),
        ("hub_ws_frames_out_total", {"type": "message"}),
        ("hub_messages_accepted_total", {"kind": "direct"}),
        ("hub_messages_delivered_total", {}),
        ("hub_delivery_latency_seconds_count", {}),
        ("hub_ws_disconnects_total", {"code": "1000"}),
    ]:
        samples.mark(name, **labels)

    a, _ = await connect(alice)
    b, _ = await connect(bob)
    assert samples.value("hub_ws_connections_open") >= 2
    for n in range(3):
        accepted = await request(a, {"type": "send", "to": "bob", "payload": n, "ref": str(n)})
        assert accepted["type"] == "accepted"
        await receive_type(b, "message")
    await a.disconnect()
    await b.disconnect()

    assert samples.delta("hub_ws_connects_total") == 2
    assert samples.delta("hub_ws_sessions_total") == 2
    assert samples.delta("hub_ws_frames_in_total", type="send") == 3
    assert samples.delta("hub_ws_frames_out_total", type="accepted") == 3
    assert samples.delta("hub_ws_frames_out_total", type="message") == 3
    assert samples.delta("hub_messages_accepted_total", kind="direct") == 3
    assert samples.delta("hub_messages_delivered_total") == 3
    assert samples.delta("hub_delivery_latency_seconds_count") == 3
    assert samples.value("hub_delivery_latency_seconds_sum") > 0
    assert samples.delta("hub_ws_disconnects_total", code="1000") == 2


async def test_it_counts_error_frames_by_code(alice, samples):
    samples.mark("hub_errors_total", transport="ws", code="invalid_json")
    samples.mark("hub_errors_total", transport="ws", code="unknown_recipient")
    a, _ = await connect(alice)
    await a.send_to(text_data="{not json")
    assert (await receive_type(a, "error"))["code"] == "invalid_json"
    answer = await request(a, {"type": "send", "to": "nobody", "payload": 1, "ref": "x"})
    assert answer["code"] == "unknown_recipient"
    await a.disconnect()
    assert samples.delta("hub_errors_total", transport="ws", code="invalid_json") == 1
    assert samples.delta("hub_errors_total", transport="ws", code="unknown_recipient") == 1


async def test_a_redelivered_message_counts_as_redelivered_not_delivered(alice, bob, samples):
    samples.mark("hub_messages_delivered_total")
    samples.mark("hub_messages_redelivered_total")
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await request(a, {"type": "send", "to": "bob", "payload": 1, "ref": "1"})
    await receive_type(b, "message")
    await b.disconnect()
    # Not acknowledged: the next session gets it again, marked redelivered.
    b, welcome = await connect(bob)
    assert welcome["pending"] == 1
    assert (await receive_type(b, "message"))["redelivered"] is True
    await a.disconnect()
    await b.disconnect()
    assert samples.delta("hub_messages_delivered_total") == 1
    assert samples.delta("hub_messages_redelivered_total") == 1


def test_it_counts_rest_rate_limit_hits_and_errors(client, monkeypatch, samples):
    cache.clear()
    monkeypatch.setattr(TokenThrottle, "rate", "2/min", raising=False)
    samples.mark("hub_rate_limit_hits_total", transport="http")
    samples.mark("hub_errors_total", transport="http", code="throttled")
    samples.mark("hub_errors_total", transport="http", code="invalid_credentials")
    body = {"agent_id": "ghost", "agent_secret": "wrong"}
    statuses = [
        client.post("/api/v1/auth/token/", body, content_type="application/json").status_code
        for _ in range(3)
    ]
    assert statuses == [401, 401, 429]
    assert samples.delta("hub_rate_limit_hits_total", transport="http") == 1
    assert samples.delta("hub_errors_total", transport="http", code="throttled") == 1
    assert samples.delta("hub_errors_total", transport="http", code="invalid_credentials") == 2
    cache.clear()


def test_metrics_serve_process_django_and_cluster_figures(client, alice, bob):
    messaging_services.message_send(sender=alice.agent, kind="direct", to="bob", payload=1)
    Delivery.objects.update(status=Delivery.Status.DEAD)
    text = scrape(client)
    # django-prometheus: HTTP and database.
    assert "django_http_requests_total_by_method_total" in text
    assert "django_db_execute_total" in text
    # Ours, per process and from the database.
    assert 'hub_messages_accepted_total{kind="direct",server=' in text
    assert sample(text, 'hub_agents{status="offline"}') == 2
    assert sample(text, "hub_deliveries_dead") == 1
    assert sample(text, 'hub_deliveries_pending{status="queued"}') == 0


def test_metrics_export_what_the_celery_sweeps_reported(client, alice, bob, settings):
    messaging_services.message_send(sender=alice.agent, kind="direct", to="bob", payload=1, ttl=60)
    Delivery.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    # Run as the worker runs them (same signals), in this process.
    expire_deliveries.apply()
    redeliver_due.apply()
    text = scrape(client)
    assert sample(text, "hub_messages_expired_total") == 1
    assert sample(text, "hub_messages_dead_lettered_total") == 0
    assert sample(text, 'hub_sweep_runs_total{task="messaging.tasks.expire_deliveries"}') == 1
    assert (
        sample(
            text, 'hub_sweep_last_result{field="count",task="messaging.tasks.expire_deliveries"}'
        )
        == 1
    )
    assert (
        sample(text, 'hub_sweep_last_run_timestamp_seconds{task="messaging.tasks.redeliver_due"}')
        > 0
    )


def test_metrics_refuse_a_client_outside_the_allowlist(client, settings):
    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
    response = client.get("/metrics", REMOTE_ADDR="192.0.2.7")
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200


def test_metrics_accept_the_token_from_anywhere_and_refuse_a_wrong_one(client, settings):
    settings.METRICS_TOKEN = "scrape-secret"
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    scrape(client, HTTP_AUTHORIZATION="Bearer scrape-secret")


def test_a_batch_counts_what_it_accepted_by_kind_when_no_line_is_logged_for_each(
    alice, bob, carol, samples, caplog
):
    import logging

    from messaging import batch
    from messaging.models import Message

    caplog.set_level(logging.WARNING, logger="hub.events")
    for kind in ("direct", "broadcast"):
        samples.mark("hub_messages_accepted_total", kind=kind)
        samples.mark("hub_messages_fanout_total", kind=kind)

    runs = []

    class Context:  # the sending socket's context, which only a log line needs
        def run(self, function, *args):
            runs.append(function)
            return function(*args)

    def send(kind, **fields):
        return batch.Outgoing(sender=alice.agent, kind=kind, payload=1, context=Context(), **fields)

    result = batch.write_batch(
        [
            send(Message.Kind.DIRECT, to="bob"),
            send(Message.Kind.DIRECT, to="carol"),
            send(Message.Kind.BROADCAST),
        ],
        [],
        {},
    )
    assert [accepted.recipients for accepted in result.sends] == [1, 1, 2]
    assert samples.delta("hub_messages_accepted_total", kind="direct") == 2
    assert samples.delta("hub_messages_fanout_total", kind="direct") == 2
    assert samples.delta("hub_messages_accepted_total", kind="broadcast") == 1
    assert samples.delta("hub_messages_fanout_total", kind="broadcast") == 2
    assert not [r for r in caplog.records if r.getMessage() == "message accepted"]
    assert runs == []
    # With a line for each, each is logged in its socket's context.
    caplog.set_level(logging.INFO, logger="hub.events")
    batch.write_batch([send(Message.Kind.DIRECT, to="bob")], [], {})
    assert len(runs) == 1
    assert [r for r in caplog.records if r.getMessage() == "message accepted"]
