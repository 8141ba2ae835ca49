"""Refuse to run production with settings that are unsafe there."""

from django.conf import settings
from django.core.checks import Error, Tags, register


@register(Tags.security)
def check_production_settings(app_configs, **kwargs):
    if not settings.HUB_PRODUCTION:
        return []
    from mcp_project.settings import DEFAULT_SECRET_KEY

    errors = []
    if settings.DEBUG:
        errors.append(Error("DEBUG is on in production.", id="hub.E001"))
    if settings.SECRET_KEY == DEFAULT_SECRET_KEY or len(settings.SECRET_KEY) < 32:
        errors.append(Error("DJANGO_SECRET_KEY is the default or too short.", id="hub.E002"))
    if "*" in settings.ALLOWED_HOSTS:
        errors.append(Error("DJANGO_ALLOWED_HOSTS must not contain '*'.", id="hub.E003"))
    backend = settings.CHANNEL_LAYERS["default"]["BACKEND"]
    if "InMemory" in backend:
        errors.append(
            Error("The in-memory channel layer cannot route between processes.", id="hub.E004")
        )
    return errors
