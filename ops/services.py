"""Operational reads and records: cluster figures, the dashboard snapshot, sweep bookkeeping."""

import logging
import numbers
from datetime import timedelta

from django.db import transaction
from django.db.models import Count
from django.db.models.functions import TruncMinute
from django.utils import timezone

from agents.models import Agent, Connection
from messaging.models import Delivery, Message

from .models import SweepRun

logger = logging.getLogger(__name__)

RATE_MINUTES = 15


def cluster_counts() -> dict:
    """Return the figures every replica shares: liveness, sessions, backlog and sweeps."""
    sessions = (
        Connection.objects.open().values("server").annotate(count=Count("id")).order_by("server")
    )
    return {
        "agents_online": Agent.objects.active().online().count(),
        "agents_offline": Agent.objects.active().offline().count(),
        "sessions_by_server": {row["server"]: row["count"] for row in sessions},
        "deliveries_queued": Delivery.objects.filter(status=Delivery.Status.QUEUED).count(),
        "deliveries_unacked": Delivery.objects.filter(status=Delivery.Status.DELIVERED).count(),
        "deliveries_dead": Delivery.objects.filter(status=Delivery.Status.DEAD).count(),
        "sweeps": list(SweepRun.objects.all()),
    }


def message_rates(*, now=None, minutes: int = RATE_MINUTES) -> list[dict]:
    """Return messages accepted per minute, by kind, over the last `minutes` minutes."""
    now = now or timezone.now()
    current = now.replace(second=0, microsecond=0)
    start = current - timedelta(minutes=minutes - 1)
    rows = (
        Message.objects.filter(created_at__gte=start)
        .annotate(minute=TruncMinute("created_at"))
        .values("minute", "kind")
        .annotate(count=Count("id"))
    )
    buckets = {start + timedelta(minutes=i): {} for i in range(minutes)}
    for row in rows:
        bucket = buckets.get(row["minute"])
        if bucket is not None:
            bucket[row["kind"]] = row["count"]
    totals = {minute: sum(kinds.values()) for minute, kinds in buckets.items()}
    peak = max(totals.values()) or 1
    return [
        {
            "minute": minute.isoformat(),
            "total": totals[minute],
            "by_kind": kinds,
            # Bar length for the dashboard, relative to the busiest minute shown.
            "percent": round(100 * totals[minute] / peak),
        }
        for minute, kinds in buckets.items()
    ]


def sweep_intervals() -> dict[str, float]:
    """Return each periodic task's interval in seconds, from the Celery beat schedule itself."""
    from mcp_project.celery import app

    app.finalize(auto=True)  # periodic tasks are added when the app finalizes
    intervals = {}
    for entry in app.conf.beat_schedule.values():
        schedule = entry["schedule"]
        seconds = schedule if isinstance(schedule, numbers.Number) else None
        if seconds is None and hasattr(schedule, "run_every"):
            seconds = schedule.run_every.total_seconds()
        if seconds is not None:
            intervals[entry["task"]] = int(seconds) if seconds == int(seconds) else seconds
    return intervals


def sweep_statuses(*, now=None) -> list[dict]:
    """Describe every scheduled sweep: when it last ran, what it said, and whether it is overdue."""
    now = now or timezone.now()
    runs = {run.name: run for run in SweepRun.objects.all()}
    statuses = []
    for name, interval in sorted(sweep_intervals().items()):
        run = runs.get(name)
        statuses.append(
            {
                "task": name,
                "interval_seconds": interval,
                "last_run_at": run.last_run_at.isoformat() if run else None,
                "seconds_ago": round((now - run.last_run_at).total_seconds(), 1) if run else None,
                "last_duration_seconds": run.last_duration_seconds if run else None,
                "last_result": run.last_result if run else None,
                "result_text": " ".join(f"{k}={v}" for k, v in run.last_result.items())
                if run
                else "",
                "last_error": run.last_error if run else "",
                "runs": run.runs if run else 0,
                "status": run.get_status(now=now, interval_seconds=interval) if run else "never",
            }
        )
    return statuses


def dashboard_snapshot(*, now=None) -> dict:
    """Return everything the operator dashboard shows, as JSON-ready data."""
    now = now or timezone.now()
    counts = cluster_counts()
    counts.pop("sweeps")
    online = list(
        Agent.objects.active().online().order_by("agent_id").values_list("agent_id", flat=True)[:50]
    )
    return {
        "generated_at": now.isoformat(),
        **counts,
        "online_agents": online,
        "message_rates": message_rates(now=now),
        "sweeps": sweep_statuses(now=now),
    }


def _numbers(result) -> dict:
    """Keep the numeric fields of a task's return value; a bare number becomes {"count": n}."""
    if isinstance(result, bool):
        return {}
    if isinstance(result, numbers.Number):
        return {"count": result}
    if isinstance(result, dict):
        return {
            str(key): value
            for key, value in result.items()
            if isinstance(value, numbers.Number) and not isinstance(value, bool)
        }
    return {}


def sweep_run_record(
    *, name: str, ran_at, duration: float, result=None, error: str = ""
) -> SweepRun:
    """Record one run of a periodic task and add what it reported to the running totals."""
    figures = _numbers(result) if not error else {}
    with transaction.atomic():
        # Two workers may run one sweep at once: create the row once, then update it under a lock.
        SweepRun.objects.get_or_create(name=name, defaults={"last_run_at": ran_at})
        run = SweepRun.objects.select_for_update().get(name=name)
        run.last_run_at = ran_at
        run.last_duration_seconds = duration
        run.last_result = figures
        run.last_error = error[:2000]
        run.runs += 1
        run.failures += 1 if error else 0
        run.totals = {
            field: run.totals.get(field, 0) + figures.get(field, 0)
            for field in {*run.totals, *figures}
        }
        run.save()
    return run
