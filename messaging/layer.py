"""The Redis channel layer, with a receive that costs one future per waiting socket.

channels-redis receives for the sockets of a process from one Redis list per process. For every
waiting consumer it runs a task that waits for the right to read that list, a task that waits on
the consumer's own asyncio.Queue (four deques), and an asyncio.wait joining the two: about 6 KB
per idle socket (tracemalloc, bench idle). Here one reader task per process pops the list and
hands each message to the future of the consumer waiting for it, or keeps it until that consumer
asks again. Everything else (sending, groups, capacity, expiry, the backup queue that makes a
cancelled pop lose nothing) is channels-redis's own.
"""

import asyncio
import collections
import logging

from channels_redis.core import RedisChannelLayer

logger = logging.getLogger(__name__)


class ChannelLayer(RedisChannelLayer):
    # After the last waiting consumer has gone, the reader stops this much later, unless another
    # one starts waiting meanwhile (a consumer handling a message is between two receives).
    READER_LINGER = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._waiting: dict[str, asyncio.Future] = {}
        self._kept: dict[str, collections.deque] = {}
        self._reader: asyncio.Task | None = None
        self._linger: asyncio.TimerHandle | None = None

    async def receive(self, channel):
        if "!" not in channel:
            return await super().receive(channel)
        return await self.next_message(channel)

    def next_message(self, channel: str) -> asyncio.Future:
        """A future of the next message on one of this process's channels (its name has a "!"),
        done at once if one is kept. Cancelling it ends the receive and drops what is kept."""
        assert "!" in channel and self.require_valid_channel_name(channel)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        kept = self._kept.get(channel)
        if kept:
            future.set_result(kept.popleft())
            if not kept:
                del self._kept[channel]
            return future
        self._forget_other_loops(loop)
        if channel in self._waiting:
            raise RuntimeError(f"{channel!r} already has a receive waiting")
        self._waiting[channel] = future
        future.add_done_callback(lambda done: self._stopped_waiting(channel, done))
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read(self.non_local_name(channel)))
        return future

    def _stopped_waiting(self, channel: str, future: asyncio.Future) -> None:
        if future.cancelled():
            # The consumer is going away: nothing will ask for what is kept for it.
            self._kept.pop(channel, None)
        if self._waiting.get(channel) is future:
            del self._waiting[channel]
        if not self._waiting and self._linger is None and self._reader is not None:
            self._linger = future.get_loop().call_later(self.READER_LINGER, self._stop_idle_reader)

    def _forget_other_loops(self, loop) -> None:
        """Start afresh on a new event loop (tests run one each); the old one's are gone."""
        if self._reader is not None and self._reader.get_loop() is not loop:
            self._reader = None
            self._linger = None
            self._waiting.clear()
            self._kept.clear()

    def _stop_idle_reader(self) -> None:
        self._linger = None
        if not self._waiting and self._reader is not None:
            # A pop cut short loses nothing: the message stays in Redis's backup queue.
            self._reader.cancel()
            self._reader = None

    async def _read(self, inbox: str) -> None:
        try:
            while True:
                channels, message = await self.receive_single(inbox)
                for channel in channels if isinstance(channels, list) else [channels]:
                    self._hand_over(channel, message)
        except Exception as exc:
            # Redis is unreachable, say: every waiting consumer hears it, as with channels-redis,
            # and the next receive starts a new reader.
            waiting, self._waiting = self._waiting, {}
            for future in waiting.values():
                if not future.done():
                    future.set_exception(exc)
            if not waiting:
                logger.warning("channel layer reader failed", exc_info=exc)

    def _hand_over(self, channel: str, message: dict) -> None:
        future = self._waiting.pop(channel, None)
        if future is not None and not future.done():
            future.set_result(message)
            return
        kept = self._kept.setdefault(channel, collections.deque())
        if len(kept) < self.capacity:
            kept.append(message)
