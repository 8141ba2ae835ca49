"""Context change events through the channel layer, sent after the change has committed.

Each change goes to two groups: "ctx.all" and the group of its context type. A socket joins only
the groups its watches need and filters the rest (owner, tag, key) locally. The event names the
route it was sent on, so a socket in both groups hands each watch exactly one copy.
"""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from .protocol import ROUTE_ALL, context_group

logger = logging.getLogger(__name__)

EVENT_TYPE = "hub.context"


def change_events(event: str, entry: dict) -> list[tuple[str, dict]]:
    """Return the (group, message) pairs that announce one change of an entry."""
    body = {"type": EVENT_TYPE, "event": event, "entry": entry, "version": entry["version"]}
    return [
        (context_group(route), {**body, "route": route})
        for route in (ROUTE_ALL, entry["context_type"])
    ]


async def _group_send_all(messages) -> None:
    layer = get_channel_layer()
    for group, message in messages:
        await layer.group_send(group, message)


def announce(changes: list[tuple[str, dict]]) -> None:
    """Send (event, entry) changes to their groups; a failure is logged, never raised.

    The database holds the truth: a watcher that missed an event catches up with
    GET contexts/?since=.
    """
    messages = [pair for event, entry in changes for pair in change_events(event, entry)]
    if not messages:
        return
    try:
        async_to_sync(_group_send_all)(messages)
    except Exception:
        logger.warning("context change could not be announced", exc_info=True)
