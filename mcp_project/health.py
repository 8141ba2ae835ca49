"""Liveness and readiness probes."""

import asyncio

from channels.layers import get_channel_layer
from django.db import connection
from django.http import JsonResponse


def healthz(request):
    return JsonResponse({"status": "ok"})


async def _redis_ok() -> bool:
    layer = get_channel_layer()
    if not hasattr(layer, "connection"):
        return True  # in-memory layer: nothing to reach
    try:
        await asyncio.wait_for(layer.connection(0).ping(), timeout=2)
    except Exception:
        return False
    return True


def readiness() -> dict[str, bool]:
    from asgiref.sync import async_to_sync

    checks = {}
    try:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = True
    except Exception:
        checks["database"] = False
    checks["redis"] = async_to_sync(_redis_ok)()
    return checks


def readyz(request):
    checks = readiness()
    failed = [name for name, ok in checks.items() if not ok]
    body = {"status": "ok" if not failed else "unavailable", "checks": checks, "failed": failed}
    return JsonResponse(body, status=503 if failed else 200)
