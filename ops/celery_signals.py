"""Celery task hooks: correlate each task's log lines, log its outcome, record sweep runs."""

import logging
import time

import structlog
from celery import signals
from django.utils import timezone

logger = logging.getLogger("hub.tasks")

_started: dict[str, tuple[float, object]] = {}
_scheduled: set[str] | None = None


def _scheduled_tasks() -> set[str]:
    global _scheduled
    if _scheduled is None:
        from . import services

        _scheduled = set(services.sweep_intervals())
    return _scheduled


@signals.task_prerun.connect
def task_started(task_id=None, task=None, **_kwargs):
    structlog.contextvars.bind_contextvars(task_id=task_id, task=task.name)
    _started[task_id] = (time.monotonic(), timezone.now())
    logger.debug("task started")


@signals.task_postrun.connect
def task_finished(task_id=None, task=None, retval=None, state=None, **_kwargs):
    started, ran_at = _started.pop(task_id, (time.monotonic(), timezone.now()))
    duration = time.monotonic() - started
    failed = isinstance(retval, BaseException)
    error = f"{type(retval).__name__}: {retval}" if failed else ""
    try:
        logger.log(
            logging.ERROR if failed else logging.INFO,
            "task finished",
            extra={
                "state": state,
                "duration_ms": round(duration * 1000, 2),
                "result": None if failed else retval,
                "error": error or None,
            },
        )
        if task.name in _scheduled_tasks():
            from . import services

            services.sweep_run_record(
                name=task.name, ran_at=ran_at, duration=duration, result=retval, error=error
            )
    except Exception:
        # Bookkeeping must never fail a task or the worker.
        logger.exception("could not record the task run")
    finally:
        structlog.contextvars.unbind_contextvars("task_id", "task")
