"""Refuse to run production with settings that are unsafe there."""

from django.conf import settings
from django.core.checks import Error, Tags, register, run_checks
from django.core.exceptions import ImproperlyConfigured

# Shorter HMAC keys can be brute-forced offline from any one token (RFC 7518 section 3.2 asks
# for at least the hash size: 256 bits for HS256).
MIN_KEY_LENGTH = 32


@register(Tags.security)
def check_production_settings(app_configs, **kwargs):
    if not settings.HUB_PRODUCTION:
        return []
    from mcp_project.settings import DEFAULT_SECRET_KEY

    errors = []
    if settings.DEBUG:
        errors.append(Error("DEBUG is on in production.", id="hub.E001"))
    if settings.SECRET_KEY == DEFAULT_SECRET_KEY or len(settings.SECRET_KEY) < MIN_KEY_LENGTH:
        errors.append(Error("DJANGO_SECRET_KEY is the default or too short.", id="hub.E002"))
    if "*" in settings.ALLOWED_HOSTS:
        errors.append(Error("DJANGO_ALLOWED_HOSTS must not contain '*'.", id="hub.E003"))
    backend = settings.CHANNEL_LAYERS["default"]["BACKEND"]
    if "InMemory" in backend:
        errors.append(
            Error("The in-memory channel layer cannot route between processes.", id="hub.E004")
        )
    signing_key = settings.SIMPLE_JWT["SIGNING_KEY"]
    if signing_key == DEFAULT_SECRET_KEY or len(signing_key) < MIN_KEY_LENGTH:
        errors.append(Error("JWT_SIGNING_KEY is the default or too short.", id="hub.E005"))
    return errors


def refuse_unsafe_production() -> None:
    """Raise ImproperlyConfigured when a security check fails; servers call this at startup.

    `manage.py check` and `migrate` run the system checks, but daphne does not, so without this a
    server would start with DEBUG on or the default secret key.
    """
    if not settings.HUB_PRODUCTION:
        return
    errors = [m for m in run_checks(tags=[Tags.security]) if m.is_serious()]
    if errors:
        problems = "; ".join(f"{m.id}: {m.msg}" for m in errors)
        raise ImproperlyConfigured(f"Refusing to start with unsafe production settings: {problems}")
