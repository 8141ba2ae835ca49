"""Context watches on the agent WebSocket: `watch` and `unwatch` frames, `context` frames out.

A mixin for messaging.consumers.AgentConsumer, which authenticates the socket, validates frames
(with the validators of contexts/protocol.py) and turns ProtocolError and HubError into error
frames. Watches belong to one socket and end with it; after a reconnect a client watches again
and catches up with GET contexts/?since=.
"""

import asyncio
import logging

from channels.db import database_sync_to_async
from django.conf import settings

from messaging.protocol import INVALID_FRAME, ProtocolError

from . import protocol, services

logger = logging.getLogger(__name__)


class ContextWatchMixin:
    # Per-socket state, made on first use: AgentConsumer.connect() knows nothing of watches.
    _context_state = None

    def _context(self) -> dict:
        if self._context_state is None:
            self._context_state = {"watches": {}, "counter": 0, "refresh": None}
        return self._context_state

    def _context_groups(self) -> set[str]:
        return {protocol.context_group(w.route) for w in self._context()["watches"].values()}

    async def frame_watch(self, frame):
        state = self._context()
        limit = settings.HUB["CONTEXT_MAX_WATCHES"]
        if len(state["watches"]) >= limit:
            raise ProtocolError(
                protocol.TOO_MANY_WATCHES,
                f"at most {limit} watches per connection; unwatch one first",
                ref=frame["ref"],
            )
        filters = frame["filters"]
        readable = await database_sync_to_async(services.context_types_readable)(
            agent=self.agent, context_type=filters.get("context_type")
        )
        state["counter"] += 1
        watch = protocol.Watch(
            watch_id=f"w{state['counter']}", filters=filters, readable=frozenset(readable)
        )
        group = protocol.context_group(watch.route)
        if group not in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups.append(group)
        state["watches"][watch.watch_id] = watch
        self._context_schedule_refresh()
        await self.send_json(
            protocol.watching_frame(ref=frame["ref"], watch_id=watch.watch_id, filters=filters)
        )

    async def frame_unwatch(self, frame):
        watch = self._context()["watches"].pop(frame["watch_id"], None)
        if watch is None:
            raise ProtocolError(
                INVALID_FRAME,
                f"watch_id: no watch {frame['watch_id']!r} on this connection",
                ref=frame["ref"],
                field="watch_id",
            )
        group = protocol.context_group(watch.route)
        if group not in self._context_groups() and group in self.groups:
            self.groups.remove(group)
            await self.channel_layer.group_discard(group, self.channel_name)
        await self.send_json(protocol.unwatched_frame(ref=frame["ref"], watch_id=watch.watch_id))

    async def hub_context(self, event):
        """Hand a change to every watch on the route it came by whose filters it passes."""
        if self._context_state is None:
            return
        entry = event["entry"]
        for watch in list(self._context_state["watches"].values()):
            if watch.route != event["route"] or not watch.matches(entry):
                continue
            try:
                await self.send_json(
                    protocol.context_frame(
                        event=event["event"],
                        watch_id=watch.watch_id,
                        entry=entry,
                        version=event["version"],
                    )
                )
            except Exception:
                # An exception here would close the socket (PITFALLS P5); the change is in the
                # database for the client to read.
                logger.exception("could not send a context frame")
                return

    # --- Group membership -----------------------------------------------------------------------

    def _context_schedule_refresh(self):
        state = self._context()
        if state["refresh"] is None:
            loop = asyncio.get_running_loop()
            state["refresh"] = loop.call_later(
                settings.HUB["GROUP_REFRESH_SECONDS"],
                lambda: asyncio.ensure_future(self._context_refresh_groups()),
            )

    async def _context_refresh_groups(self):
        """Join the watch groups again: channels-redis forgets members after group_expiry (P3)."""
        state = self._context()
        state["refresh"] = None
        groups = self._context_groups()
        try:
            for group in groups:
                await self.channel_layer.group_add(group, self.channel_name)
        except Exception:
            logger.warning("could not refresh context watch groups", exc_info=True)
        if groups:
            self._context_schedule_refresh()

    async def websocket_disconnect(self, message):
        if self._context_state is not None and self._context_state["refresh"] is not None:
            self._context_state["refresh"].cancel()
            self._context_state["refresh"] = None
        await super().websocket_disconnect(message)
