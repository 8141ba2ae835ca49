"""System checks for the operations settings."""

import ipaddress

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.security)
def check_metrics_access(app_configs, **kwargs):
    """Refuse malformed allowlist entries; warn when /metrics is open to anyone in production."""
    messages = []
    for entry in settings.METRICS_ALLOWED_IPS:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            messages.append(
                checks.Error(
                    f"METRICS_ALLOWED_IPS entry {entry!r} is not an IP address or network.",
                    id="ops.E001",
                )
            )
    if getattr(settings, "HUB_PRODUCTION", False) and not (
        settings.METRICS_ALLOWED_IPS or settings.METRICS_TOKEN
    ):
        messages.append(
            checks.Warning(
                "/metrics is open to every client.",
                hint="Set HUB_METRICS_ALLOWED_IPS (networks of the scrapers) or HUB_METRICS_TOKEN.",
                id="ops.W001",
            )
        )
    return messages
