"""Nudges through the channel layer. Losing one never loses a message: the database has it."""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from agents.live import agent_group

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


def notify_replay(recipient_ids) -> None:
    _send([(agent_group(recipient_id), {"type": "hub.replay"}) for recipient_id in recipient_ids])


def notify_response(requester_id: int, response: dict) -> None:
    _send([(agent_group(requester_id), {"type": "hub.response", **response})])
