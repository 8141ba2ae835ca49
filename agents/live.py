"""Live signals to sockets through the channel layer; the database already holds the truth."""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)


def agent_group(agent_pk: int) -> str:
    """Name the group every socket of one agent joins (ASCII only, never raw user input)."""
    return f"agent.{agent_pk}"


def _send(coro_factory) -> None:
    async def run():
        # async_to_sync wants a coroutine function, not a lambda that returns a coroutine.
        await coro_factory()

    try:
        async_to_sync(run)()
    except Exception:
        # Closing is best effort: a socket we cannot reach is reaped by the liveness sweep, and
        # its revoked token is refused on its next frame.
        logger.exception("could not signal sockets through the channel layer")


def close_agent_sockets(agent_pk: int, code: int) -> None:
    layer = get_channel_layer()
    _send(lambda: layer.group_send(agent_group(agent_pk), {"type": "hub.close", "code": code}))


def close_channels(targets, code: int, *, token_jti: str | None = None) -> None:
    """Close specific sockets by channel name; with token_jti only those opened with that token."""
    layer = get_channel_layer()
    event = {"type": "hub.close", "code": code}
    if token_jti:
        event["token_jti"] = token_jti

    async def send_all():
        for channel_name, _agent_pk in targets:
            await layer.send(channel_name, event)

    _send(lambda: send_all())
