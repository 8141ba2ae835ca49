import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcp_project.settings")

app = Celery("mcp_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_finalize.connect
def schedule_sweeps(sender, **kwargs):
    from django.conf import settings

    every = settings.HUB["SWEEP_INTERVAL"]
    sender.add_periodic_task(
        every, sender.signature("agents.tasks.sweep_liveness"), name="liveness sweep"
    )
    sender.add_periodic_task(
        every, sender.signature("messaging.tasks.redeliver_due"), name="redelivery sweep"
    )
    sender.add_periodic_task(
        every, sender.signature("messaging.tasks.expire_deliveries"), name="expiry sweep"
    )
    sender.add_periodic_task(
        3600, sender.signature("messaging.tasks.purge_old_messages"), name="message purge"
    )
    sender.add_periodic_task(
        3600, sender.signature("agents.tasks.purge_expired_tokens"), name="token purge"
    )
    sender.add_periodic_task(
        settings.HUB["CONTEXT_PURGE_INTERVAL"],
        sender.signature("contexts.tasks.purge_expired_contexts"),
        name="context purge",
    )
