"""Nudges through the channel layer. Losing one never loses a message: the database has it."""

import logging

from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer

from agents.live import agent_group
from agents.models import Connection

logger = logging.getLogger(__name__)


async def _group_send_all(events) -> None:
    layer = get_channel_layer()
    for group, event in events:
        await layer.group_send(group, event)


def _send(events) -> None:
    if not events:
        return
    try:
        async_to_sync(_group_send_all)(events)
    except Exception:
        # Redis unreachable or the channel full: the rows are committed and the redelivery sweep
        # (or the recipient's next connect) replays them (PITFALLS P1, P2, P7).
        logger.warning("channel layer nudge failed; delivery falls back to replay", exc_info=True)


def notify_deliveries(frames_by_recipient: dict[int, dict]) -> None:
    _send(
        [
            (agent_group(recipient_id), {"type": "hub.deliver", "frames": [frame]})
            for recipient_id, frame in frames_by_recipient.items()
        ]
    )


def notify_replay(recipient_ids, *, delivered_before=None) -> None:
    """Ask the recipients' sockets to resend queued rows and rows written before the cutoff.

    Sent to each open connection's own channel rather than to the agent's group: a Redis that
    restarted empty has forgotten every group, and this is what reaches those sockets again
    (the consumer then re-joins its group).
    """
    event = {"type": "hub.replay"}
    if delivered_before is not None:
        # A POSIX timestamp: layer events are msgpack, which has no datetime.
        event["delivered_before"] = delivered_before.timestamp()
    ids = list(recipient_ids)
    names: list[str] = []
    for start in range(0, len(ids), 500):  # bounded query parameters, as in services.chunks
        open_connections = Connection.objects.open().filter(agent_id__in=ids[start : start + 500])
        names += open_connections.values_list("channel_name", flat=True)
    if names:
        try:
            async_to_sync(_send_each)(names, event)
        except Exception:
            logger.warning("replay nudge failed; the next sweep retries", exc_info=True)


async def _send_each(channel_names, event) -> None:
    layer = get_channel_layer()
    for name in channel_names:
        try:
            await layer.send(name, event)
        except ChannelFull:
            # A socket this far behind is replaying already, or its process died and the
            # liveness sweep will close the row; either way the next sweep tries again.
            continue


def notify_response(requester_id: int, response: dict) -> None:
    _send([(agent_group(requester_id), {"type": "hub.response", **response})])
