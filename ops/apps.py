from django.apps import AppConfig


class OpsConfig(AppConfig):
    name = "ops"
    verbose_name = "Operations"

    def ready(self):
        # Receivers and checks are registered here, not at import time of unrelated modules.
        from . import celery_signals, checks  # noqa: F401
