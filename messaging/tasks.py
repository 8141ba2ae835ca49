from celery import shared_task

from . import services


@shared_task(name="messaging.tasks.redeliver_due", ignore_result=True)
def redeliver_due() -> dict:
    return services.deliveries_redeliver_due()


@shared_task(name="messaging.tasks.expire_deliveries", ignore_result=True)
def expire_deliveries() -> int:
    return services.deliveries_expire()


@shared_task(name="messaging.tasks.purge_old_messages", ignore_result=True)
def purge_old_messages() -> int:
    return services.messages_purge_old()
