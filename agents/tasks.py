from celery import shared_task

from . import services


@shared_task(name="agents.tasks.sweep_liveness", ignore_result=True)
def sweep_liveness() -> int:
    return services.connections_sweep()


@shared_task(name="agents.tasks.purge_expired_tokens", ignore_result=True)
def purge_expired_tokens() -> int:
    return services.tokens_purge_expired()
