import hmac
import ipaddress
from functools import cache

from django.conf import settings
from django.contrib import admin
from django.http import HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import services
from .metrics import CLUSTER_REGISTRY

# How often the dashboard page polls its data endpoint.
DASHBOARD_REFRESH_SECONDS = 5


@cache
def _allowed_networks(entries: tuple[str, ...]):
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def metrics_allowed(request) -> bool:
    """Allow a scrape from an allowlisted address or with the token; open when neither is set."""
    token = settings.METRICS_TOKEN
    networks = _allowed_networks(tuple(settings.METRICS_ALLOWED_IPS))
    if not token and not networks:
        return True
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token):
            return True
    if networks:
        try:
            address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
        except ValueError:
            return False
        return any(address in network for network in networks)
    return False


def metrics(request):
    """Serve this process's metrics and the cluster's, in the Prometheus text format."""
    if not metrics_allowed(request):
        return JsonResponse(
            {"detail": "Not allowed to read metrics.", "code": "forbidden"}, status=403
        )
    body = generate_latest(REGISTRY) + generate_latest(CLUSTER_REGISTRY)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


def dashboard(request):
    context = {
        **admin.site.each_context(request),
        "title": "Hub dashboard",
        "snapshot": services.dashboard_snapshot(),
        "refresh_seconds": DASHBOARD_REFRESH_SECONDS,
    }
    return TemplateResponse(request, "ops/dashboard.html", context)


def dashboard_data(request):
    return JsonResponse(services.dashboard_snapshot())
