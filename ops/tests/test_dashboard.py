from datetime import timedelta

import pytest
from django.utils import timezone

from agents import services as agent_services
from messaging import services as messaging_services
from messaging.models import Delivery, Message
from ops import services
from ops.models import SweepRun

pytestmark = pytest.mark.django_db

DASHBOARD = "/admin/ops/dashboard/"
DATA = "/admin/ops/dashboard/data/"


@pytest.fixture
def busy_hub(alice, bob, carol):
    """Alice and bob connected on two servers, carol offline, traffic, a dead letter, sweeps."""
    agent_services.connection_open(agent=alice.agent, channel_name="c1", server="web1")
    agent_services.connection_open(agent=bob.agent, channel_name="c2", server="web2")
    agent_services.connection_open(agent=bob.agent, channel_name="c3", server="web2")
    for n in range(3):
        messaging_services.message_send(sender=alice.agent, kind="direct", to="carol", payload=n)
    messaging_services.message_send(sender=bob.agent, kind="broadcast", payload="hi")
    dead = Delivery.objects.filter(recipient=carol.agent).order_by("seq").first()
    Delivery.objects.filter(pk=dead.pk).update(status=Delivery.Status.DEAD)
    # An older message outside the window must not be counted.
    old = Message.objects.filter(kind="broadcast").get()
    Message.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(hours=1))
    services.sweep_run_record(
        name="messaging.tasks.redeliver_due", ran_at=timezone.now(), duration=0.01,
        result={"dead": 1, "replayed_recipients": 2},
    )  # fmt: skip
    services.sweep_run_record(
        name="agents.tasks.sweep_liveness", ran_at=timezone.now() - timedelta(hours=1),
        duration=0.02, result=0,
    )  # fmt: skip


def test_the_dashboard_shows_live_figures_of_the_hub(admin_client, busy_hub):
    response = admin_client.get(DASHBOARD)
    assert response.status_code == 200
    snapshot = response.context["snapshot"]
    assert snapshot["agents_online"] == 2 and snapshot["agents_offline"] == 1
    assert snapshot["sessions_by_server"] == {"web1": 1, "web2": 2}
    assert snapshot["deliveries_dead"] == 1
    # Carol's two live directs, and bob's broadcast to alice and carol.
    assert snapshot["deliveries_queued"] == 2 + 2
    assert sum(row["total"] for row in snapshot["message_rates"]) == 3
    html = response.content.decode()
    assert "web1" in html and "web2" in html
    assert "messaging.tasks.redeliver_due" in html
    assert 'data-url="/admin/ops/dashboard/data/"' in html


def test_the_data_endpoint_reports_rates_per_minute_and_sweep_freshness(admin_client, busy_hub):
    data = admin_client.get(DATA).json()
    rates = data["message_rates"]
    assert len(rates) == services.RATE_MINUTES
    # The three directs were sent moments ago: this minute, or the last one if it just turned.
    recent = rates[-2:]
    assert sum(row["total"] for row in recent) == 3
    assert sum(row["by_kind"].get("direct", 0) for row in recent) == 3
    assert all(row["total"] == 0 for row in rates[:-2])  # the hour-old broadcast is outside
    assert max(row["percent"] for row in rates) == 100
    sweeps = {sweep["task"]: sweep for sweep in data["sweeps"]}
    assert sweeps["messaging.tasks.redeliver_due"]["status"] == "ok"
    assert sweeps["messaging.tasks.redeliver_due"]["last_result"] == {
        "dead": 1, "replayed_recipients": 2,
    }  # fmt: skip
    # Beat runs it every few seconds; an hour of silence means beat or the worker is down.
    assert sweeps["agents.tasks.sweep_liveness"]["status"] == "overdue"
    assert sweeps["messaging.tasks.expire_deliveries"]["status"] == "never"
    assert data["online_agents"] == ["alice", "bob"]


def test_only_staff_see_the_dashboard(client, django_user_model):
    assert client.get(DASHBOARD).status_code == 302
    assert client.get(DATA).status_code == 302
    client.force_login(django_user_model.objects.create_user("visitor"))
    assert client.get(DATA).status_code == 302


def test_the_admin_index_links_the_dashboard(admin_client):
    html = admin_client.get("/admin/").content.decode()
    assert f'href="{DASHBOARD}"' in html


def test_sweep_runs_add_up_and_record_failures():
    now = timezone.now()
    services.sweep_run_record(name="t", ran_at=now, duration=1, result={"dead": 2, "note": "x"})
    services.sweep_run_record(name="t", ran_at=now, duration=1, result={"dead": 3})
    run = services.sweep_run_record(name="t", ran_at=now, duration=1, error="boom")
    run = SweepRun.objects.get(name="t")
    assert (run.runs, run.failures, run.totals) == (3, 1, {"dead": 5})
    assert run.last_error == "boom" and run.last_result == {}
