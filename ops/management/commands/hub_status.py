import json

from django.core.management.base import BaseCommand

from mcp_project import health
from ops import services


class Command(BaseCommand):
    help = (
        "Print the hub's readiness (database, Redis, migrations) as /readyz reports it, plus "
        "agents, "
        "sessions, backlog and sweeps. Exits 1 when not ready."
    )

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Print one JSON object.")

    def handle(self, *args, **options):
        report = health.readiness_report()
        details = None
        if report["checks"]["database"] and report["checks"]["migrations"]:
            details = services.dashboard_snapshot()
        if options["json"]:
            self.stdout.write(json.dumps({**report, "details": details}, indent=2, default=str))
        else:
            self._print(report, details)
        if report["failed"]:
            raise SystemExit(1)

    def _print(self, report, details):
        style = self.style.SUCCESS if not report["failed"] else self.style.ERROR
        self.stdout.write(style(f"status: {report['status']}"))
        for name, ok in report["checks"].items():
            mark = self.style.SUCCESS("ok") if ok else self.style.ERROR("FAILED")
            self.stdout.write(f"  {name:<12} {mark}")
        if details is None:
            return
        self.stdout.write(
            f"agents: {details['agents_online']} online, {details['agents_offline']} offline"
        )
        self.stdout.write("open sessions by server:")
        for server, count in details["sessions_by_server"].items() or [("(none)", 0)]:
            self.stdout.write(f"  {server:<40} {count}")
        self.stdout.write(
            f"deliveries: {details['deliveries_queued']} queued, "
            f"{details['deliveries_unacked']} delivered unacknowledged, "
            f"{details['deliveries_dead']} dead"
        )
        last = details["message_rates"][-1]["total"] if details["message_rates"] else 0
        self.stdout.write(f"messages accepted this minute: {last}")
        self.stdout.write("sweeps:")
        for sweep in details["sweeps"]:
            ago = "never" if sweep["seconds_ago"] is None else f"{sweep['seconds_ago']}s ago"
            self.stdout.write(f"  {sweep['task']:<40} {sweep['status']:<8} {ago}")
