"""Graceful restart of a daphne server process.

On SIGTERM (or SIGINT) the process stops listening, fails /readyz, closes every agent socket with
1012 ("server restarting") so agents reconnect to another replica at once, waits up to
HUB["SHUTDOWN_GRACE_SECONDS"] for the sockets to finish closing, then stops the reactor. A second
signal stops at once.

Nothing accepted is lost: a message is committed before its sender hears `accepted`, and every
unacknowledged delivery is replayed on the recipient's next connection, wherever that lands.
Deliveries written to a socket but not yet recorded are queued by the consumer for the message
writer, which stores what is queued before the reactor stops.

Daphne sends no ASGI lifespan events and handles signals inside Twisted, so the hook is a
handler installed once the reactor runs (replacing Twisted's, which would stop it at once).
"""

import asyncio
import contextlib
import logging
import signal
import sys
import time
import weakref

from django.conf import settings

logger = logging.getLogger(__name__)

CLOSE_RESTARTING = 1012

# Every consumer with an accepted socket in this process. Weak, so a consumer whose disconnect()
# never ran (PITFALLS P4) does not linger here.
live_consumers: "weakref.WeakSet" = weakref.WeakSet()
draining = False
_installed = False
# Close tasks started outside drain(), kept referenced until they finish.
_closing: set = set()


def track(consumer) -> None:
    """Register an accepted socket; one accepted while draining is told to go elsewhere."""
    live_consumers.add(consumer)
    if draining:
        task = asyncio.ensure_future(_close(consumer))
        _closing.add(task)
        task.add_done_callback(_closing.discard)


# Close codes RFC 6455 lets a server send that autobahn's sendClose() refuses (it allows only
# 1000 and 3000-4999, the browser-side rule), so daphne cannot send them (daphne#374).
SERVER_CLOSE_CODES = frozenset({1001, 1008, 1009, 1011, 1012, 1013})


def install() -> None:
    """Under daphne: let sockets close with 1012, and drain on SIGTERM once the reactor runs.

    daphne.server installs the asyncio reactor when imported (the daphne app does that in every
    Django process), but only a daphne server runs it; elsewhere the trigger never fires.
    """
    global _installed
    if _installed or "daphne.server" not in sys.modules:
        return
    from twisted.internet import reactor

    _installed = True
    _allow_server_close_codes()
    reactor.callWhenRunning(_install_handlers)


def _allow_server_close_codes() -> None:
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.serverClose

    def server_close(protocol, code=None):
        if code in SERVER_CLOSE_CODES:
            # The frame-level call autobahn's own sendClose() ends in, minus the client rule.
            protocol.sendCloseFrame(code=code, isReply=False)
        else:
            original(protocol, code)

    WebSocketProtocol.serverClose = server_close


def _install_handlers() -> None:
    # Runs after Twisted installed its own handlers (during startup), so these replace them.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def _on_signal(signum, _frame) -> None:
    from twisted.internet import reactor

    if draining:
        logger.warning("second signal: stopping now", extra={"signal": signum})
        reactor.callFromThread(_stop_reactor)
        return
    reactor.callFromThread(lambda: asyncio.ensure_future(drain()))


def _stop_reactor() -> None:
    from twisted.internet import error, reactor

    with contextlib.suppress(error.ReactorNotRunning):
        reactor.stop()


def _stop_listening() -> None:
    from twisted.internet import reactor, tcp

    for reader in reactor.getReaders():
        if isinstance(reader, tcp.Port):
            reader.stopListening()


async def _close(consumer) -> None:
    from .metrics import SHUTDOWN_CLOSES, child

    try:
        await consumer.close(code=CLOSE_RESTARTING, reason="server restarting")
        child(SHUTDOWN_CLOSES).inc()
    except Exception:
        logger.warning("could not close a socket for restart", exc_info=True)


async def _store_what_is_queued() -> None:
    """Let the message writer store what the closing sockets queued last (delivered marks)."""
    from messaging.engine import engine

    try:
        await engine().close()
    except Exception:
        logger.warning("the message writer did not finish", exc_info=True)


async def drain(*, grace: float | None = None, stop=_stop_reactor) -> int:
    """Close every live socket with 1012, wait for them to finish, then stop; return the count."""
    global draining
    draining = True
    grace = settings.HUB["SHUTDOWN_GRACE_SECONDS"] if grace is None else grace
    try:
        _stop_listening()
    except Exception:
        logger.warning("could not stop listening", exc_info=True)
    consumers = list(live_consumers)
    logger.warning(
        "shutting down: closing sockets with 1012",
        extra={"sockets": len(consumers), "grace": grace},
    )
    await asyncio.gather(*(_close(consumer) for consumer in consumers))
    deadline = time.monotonic() + grace
    while live_consumers and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if live_consumers:
        logger.warning(
            "sockets still open at the end of the grace period",
            extra={"sockets": len(live_consumers)},
        )
    await _store_what_is_queued()
    stop()
    return len(consumers)
