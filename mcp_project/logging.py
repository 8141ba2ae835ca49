"""Structured logs: one JSON object per line in production, coloured key=value lines in development.

Every record goes through the standard library (Django, Celery, daphne and our own modules all
use `logging.getLogger`), and a structlog `ProcessorFormatter` renders it. Fields passed with
`extra={...}` become keys, and ids bound with `structlog.contextvars.bind_contextvars` (request
id, agent id, session id, Celery task id) are added to every line written in that context.
"""

import logging
import os
import socket

import orjson
import structlog

FORMATS = ("json", "console")


_server_name = {}


def _server(_logger, _method, event_dict):
    """Name the process on every line as connections and metrics do: HUB_SERVER_NAME or host:pid."""
    pid = os.getpid()
    name = _server_name.get(pid)
    if name is None:
        name = _server_name[pid] = (
            os.environ.get("HUB_SERVER_NAME") or f"{socket.gethostname()}:{pid}"
        )
    event_dict.setdefault("server", name)
    return event_dict


def _dumps(obj, **_kwargs) -> str:
    # orjson writes datetimes and UUIDs natively; anything else is shown by its str().
    return orjson.dumps(obj, default=str).decode()


def _pre_chain():
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _server,
    ]


def formatter(fmt: str = "json") -> logging.Formatter:
    """Build the formatter named in LOGGING; also configure structlog's own loggers to match."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    structlog.configure(
        processors=[*_pre_chain(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    if fmt == "json":
        renderers = [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
    else:
        renderers = [structlog.dev.ConsoleRenderer(colors=False)]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_pre_chain(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
    )


def config(*, level: str, fmt: str) -> dict:
    """Return the LOGGING dict: everything to stderr through one structured formatter."""
    if fmt not in FORMATS:
        raise ValueError(f"HUB_LOG_FORMAT must be one of {FORMATS}, got {fmt!r}")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"structured": {"()": "mcp_project.logging.formatter", "fmt": fmt}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "structured"}},
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            # Over-capacity drops are recoverable (the database holds the message) but worth a
            # warning (PITFALLS P1).
            "channels_redis": {"level": "WARNING"},
            "django.db.backends": {"level": "WARNING"},
            # Django logs every 4xx/5xx itself; our request log line carries the same and more.
            "django.request": {"level": "ERROR"},
            # One line per HTTP request from daphne duplicates ours.
            "django.server": {"level": "WARNING"},
        },
    }
