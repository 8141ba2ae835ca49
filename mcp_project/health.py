"""Liveness and readiness probes, shared by /healthz, /readyz and `manage.py hub_status`.

/healthz answers as long as the process serves requests: a failing one means restart it.
/readyz answers 200 only when the database and Redis answer, every migration is applied and the
process is not shutting down; a load balancer sends no traffic to a replica that fails it.
"""

import asyncio
import logging
import os
import socket

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import JsonResponse

logger = logging.getLogger(__name__)

# Once true it stays true for the life of the process: new migrations come with new code.
_migrations_applied = False


def _server() -> str:
    return settings.HUB["SERVER_NAME"] or f"{socket.gethostname()}:{os.getpid()}"


def healthz(request):
    return JsonResponse({"status": "ok", "server": _server()})


def _database_ok() -> bool:
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        logger.warning("readiness: database unreachable", exc_info=True)
        return False
    return True


async def _redis_ok() -> bool:
    layer = get_channel_layer()
    if not hasattr(layer, "connection"):
        return True  # in-memory layer: nothing to reach
    try:
        await asyncio.wait_for(layer.connection(0).ping(), timeout=2)
    except Exception:
        logger.warning("readiness: redis unreachable", exc_info=True)
        return False
    return True


def _migrations_ok() -> bool:
    """Check that every migration on disk is applied to the database."""
    global _migrations_applied
    if _migrations_applied:
        return True
    from django.db.migrations.executor import MigrationExecutor

    try:
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except Exception:
        logger.warning("readiness: could not read the migration state", exc_info=True)
        return False
    if plan:
        logger.warning(
            "readiness: migrations not applied",
            extra={"unapplied": [f"{m.app_label}.{m.name}" for m, _backwards in plan][:20]},
        )
        return False
    _migrations_applied = True
    return True


def readiness() -> dict[str, bool]:
    from asgiref.sync import async_to_sync

    from ops import shutdown

    database = _database_ok()
    return {
        "database": database,
        "redis": async_to_sync(_redis_ok)(),
        "migrations": database and _migrations_ok(),
        # False once a graceful shutdown began: the balancer should send new agents elsewhere.
        "accepting": not shutdown.draining,
    }


def readiness_report() -> dict:
    checks = readiness()
    failed = [name for name, ok in checks.items() if not ok]
    return {
        "status": "ok" if not failed else "unavailable",
        "server": _server(),
        "checks": checks,
        "failed": failed,
    }


def readyz(request):
    report = readiness_report()
    return JsonResponse(report, status=503 if report["failed"] else 200)
