from celery import shared_task

from . import services


@shared_task(name="contexts.tasks.purge_expired_contexts", ignore_result=True)
def purge_expired_contexts() -> int:
    """Delete expired context entries in batches and announce each as expired."""
    return services.contexts_purge_expired()
