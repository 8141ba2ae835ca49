"""Hooks the consumer and the services call at each event: count it, log it, correlate it.

Each hook is one call at the place the event happens, so transports stay thin and the metric
names and log fields live in one module. On the per-frame path a hook costs a dict lookup and a
counter increment; only the rarer events (sessions, errors, accepted messages) write a log line.
"""

import logging
import weakref
from datetime import UTC, datetime

import structlog

from . import shutdown
from .metrics import (
    DELIVERY_LATENCY,
    ERRORS,
    FRAMES_IN,
    FRAMES_OUT,
    MESSAGES_ACCEPTED,
    MESSAGES_DELIVERED,
    MESSAGES_RECIPIENTS,
    MESSAGES_REDELIVERED,
    RATE_LIMIT_HITS,
    WS_CONNECTIONS_OPEN,
    WS_CONNECTS,
    WS_DISCONNECTS,
    WS_SESSIONS,
    WS_SESSIONS_OPEN,
    child,
)

logger = logging.getLogger("hub.events")

live_consumers = shutdown.live_consumers
# Consumers with an authenticated agent session, for the sessions gauge.
_sessions: "weakref.WeakSet" = weakref.WeakSet()
_gauges_bound = False


def _bind_gauges() -> None:
    """Make the open-socket gauges read the live sets at scrape time, so they cannot drift."""
    global _gauges_bound
    _gauges_bound = True
    child(WS_CONNECTIONS_OPEN).set_function(lambda: len(live_consumers))
    child(WS_SESSIONS_OPEN).set_function(lambda: len(_sessions))


def socket_opened(consumer) -> None:
    """Count an accepted WebSocket and register its consumer for the graceful shutdown."""
    if not _gauges_bound:
        _bind_gauges()
    shutdown.track(consumer)
    child(WS_CONNECTS).inc()


def session_opened(consumer) -> None:
    """Bind the session's ids to every later log line of this connection and count it."""
    structlog.contextvars.bind_contextvars(
        agent_id=consumer.agent.agent_id, session_id=str(consumer.connection.session_id)
    )
    _sessions.add(consumer)
    child(WS_SESSIONS).inc()
    logger.info("session opened")


def socket_closed(consumer, code) -> None:
    was_open = consumer in live_consumers
    live_consumers.discard(consumer)
    _sessions.discard(consumer)
    if was_open:
        child(WS_DISCONNECTS, str(code)).inc()
        logger.info("socket closed", extra={"close_code": code})


def frame_in(frame_type: str) -> None:
    """Count a parsed client frame; the error frame answering an unparsable one is counted too.
    On the event loop only (FRAMES_IN is a Tally), as frame_out."""
    FRAMES_IN.inc(frame_type)


def frame_out(frame: dict) -> None:
    """Count a server frame as it is encoded; message frames also count deliveries and latency."""
    frame_type = frame.get("type", "")
    FRAMES_OUT.inc(frame_type)
    if frame_type == "message":
        if frame.get("redelivered"):
            MESSAGES_REDELIVERED.inc()
            return
        MESSAGES_DELIVERED.inc()
        try:
            sent_at = datetime.fromisoformat(frame["sent_at"])
        except (KeyError, TypeError, ValueError):
            return
        DELIVERY_LATENCY.observe(max((datetime.now(UTC) - sent_at).total_seconds(), 0.0))
    elif frame_type == "error":
        error(
            frame.get("code", ""), transport="ws", ref=frame.get("ref"), detail=frame.get("detail")
        )


def error(code: str, *, transport: str, **fields) -> None:
    """Count an error answer by code; rate-limit refusals are counted on their own as well."""
    child(ERRORS, transport, code).inc()
    if code == "rate_limited":
        child(RATE_LIMIT_HITS, transport).inc()
    level = logging.ERROR if code == "internal" else logging.INFO
    logger.log(level, "error answered", extra={"code": code, "transport": transport, **fields})


def message_accepted(*, message_id, kind: str, recipients: int) -> None:
    messages_accepted(kind, 1, recipients)
    logger.info(
        "message accepted",
        extra={
            "message_id": str(message_id),
            "kind": kind,
            "recipients": recipients,
        },
    )


def messages_accepted(kind: str, count: int, recipients: int) -> None:
    """Count accepted messages of one kind and their recipients, without a log line each."""
    child(MESSAGES_ACCEPTED, kind).inc(count)
    child(MESSAGES_RECIPIENTS, kind).inc(recipients)


def accepted_messages_logged() -> bool:
    """Whether each accepted message gets a log line (INFO): else counting them is enough."""
    return logger.isEnabledFor(logging.INFO)


def http_error(*, status: int, code: str | None) -> None:
    """Count an HTTP error answer; the request log line already describes it."""
    code = code or f"http_{status}"
    child(ERRORS, "http", code).inc()
    if status == 429 or code == "rate_limited":
        child(RATE_LIMIT_HITS, "http").inc()
