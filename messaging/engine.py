"""Group commit and local delivery for the agent sockets of one server process.

Every socket's sends, acknowledgements and "written to the socket" marks wait in one queue. A
single writer takes everything queued, stores it in one transaction (`batch.write_batch`) and
answers each waiter after the commit: under load one commit serves hundreds of frames, with no
load a frame waits for nobody. A recipient whose sockets are on this process gets its frames
straight from here; the channel layer carries only what sockets on other processes must see.
"""

import asyncio
import logging
import weakref

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from agents.live import agent_group

from . import batch

logger = logging.getLogger(__name__)

# Sends stored per transaction at most; the rest wait for the next one.
MAX_BATCH_SENDS = 500


class Engine:
    def __init__(self):
        self._sends: list[tuple[batch.Outgoing, asyncio.Future]] = []
        self._acks: list[tuple[batch.Ack, asyncio.Future]] = []
        self._marks: dict[int, list[int]] = {}
        self._touches: dict[int, int] = {}
        self._writer: asyncio.Task | None = None
        self.batches_written = 0
        # The sockets of this process with an agent session, by channel name.
        self.sockets: dict[str, object] = {}

    # --- What sockets ask -------------------------------------------------------------------

    def attach(self, consumer) -> None:
        self.sockets[consumer.channel_name] = consumer

    def detach(self, consumer) -> None:
        if self.sockets.get(consumer.channel_name) is consumer:
            del self.sockets[consumer.channel_name]

    def send(self, outgoing: batch.Outgoing) -> asyncio.Future:
        """Queue a send; the future gives its `Accepted` after the commit, or the refusal."""
        future = asyncio.get_running_loop().create_future()
        self._sends.append((outgoing, future))
        self._wake()
        return future

    def ack(self, ack: batch.Ack) -> asyncio.Future:
        """Queue an acknowledgement; the future gives how many deliveries it settled."""
        future = asyncio.get_running_loop().create_future()
        self._acks.append((ack, future))
        self._wake()
        return future

    def mark_delivered(self, recipient_id: int, seqs: list[int]) -> None:
        """Record, with the next batch, that these frames were written to a socket."""
        self._marks.setdefault(recipient_id, []).extend(seqs)
        self._wake()

    def touch(self, connection_id: int, agent_id: int) -> None:
        """Record, with the next batch, that a connection and its agent showed signs of life."""
        self._touches[connection_id] = agent_id
        self._wake()

    # --- The writer ---------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_while_queued())

    async def _write_while_queued(self) -> None:
        try:
            while self._sends or self._acks or self._marks or self._touches:
                sends = self._sends[:MAX_BATCH_SENDS]
                del self._sends[:MAX_BATCH_SENDS]
                acks, self._acks = self._acks, []
                marks, self._marks = self._marks, {}
                touches, self._touches = self._touches, {}
                await self._write(sends, acks, marks, touches)
        finally:
            self._writer = None

    async def _write(self, sends, acks, marks, touches) -> None:
        try:
            result = await database_sync_to_async(batch.write_batch)(
                [outgoing for outgoing, _ in sends], [ack for ack, _ in acks], marks, touches
            )
        except Exception as exc:
            # Nothing of the batch was stored: every waiter hears why (delivered marks are lost,
            # so those rows stay queued and are replayed: at least once, never lost; a lost
            # touch is made again by a later frame).
            logger.warning("a batch could not be stored", exc_info=exc)
            for _, future in sends + acks:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches_written += 1
        for (_, future), outcome in zip(sends, result.sends, strict=True):
            if future.done():
                continue  # the socket went away while waiting
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        for (_, future), count in zip(acks, result.acks, strict=True):
            if not future.done():
                future.set_result(count)
        await self._route(result.frames, result.channels)

    async def _route(self, frames: dict[int, list[dict]], channels: dict[int, list[str]]) -> None:
        """Hand frames to local sockets; nudge the recipient's group if it has sockets elsewhere."""
        remote = []
        for recipient_id, recipient_frames in frames.items():
            elsewhere = False
            for channel_name in channels.get(recipient_id, ()):
                consumer = self.sockets.get(channel_name)
                if consumer is None:
                    elsewhere = True
                else:
                    consumer.deliver_local(recipient_frames)
            if elsewhere:
                remote.append((recipient_id, recipient_frames))
        if not remote:
            return
        layer = get_channel_layer()
        try:
            for recipient_id, recipient_frames in remote:
                await layer.group_send(
                    agent_group(recipient_id), {"type": "hub.deliver", "frames": recipient_frames}
                )
        except Exception:
            # The rows are committed: the recipient's socket catches up or the sweep replays.
            logger.warning(
                "channel layer nudge failed; delivery falls back to replay", exc_info=True
            )


_engines: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Engine]" = (
    weakref.WeakKeyDictionary()
)


def engine() -> Engine:
    """This event loop's engine (one per server process; tests run a loop each)."""
    loop = asyncio.get_running_loop()
    current = _engines.get(loop)
    if current is None:
        current = _engines[loop] = Engine()
    return current
