"""The agent WebSocket: authentication, frames in, deliveries out.

Handlers stay thin: each validated frame calls a service through `database_sync_to_async`, and
every failure becomes an `error` frame so one bad frame never ends the connection (PITFALLS P5).
"""

import asyncio
import logging
import os
import socket
import time

import orjson
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from agents import services as agent_services
from agents.live import agent_group
from security.services import request_source

from . import protocol, services
from .models import Mailbox, Message

logger = logging.getLogger(__name__)

# Deliveries written to the socket are recorded in batches this often (seconds).
DELIVERED_FLUSH_DELAY = 0.05
REPLAY_PAGE = 500


def server_name() -> str:
    return settings.HUB["SERVER_NAME"] or f"{socket.gethostname()}:{os.getpid()}"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def bearer_token(scope) -> str | None:
    value = _header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def origin_allowed(scope) -> bool:
    """A present Origin must be on the allowlist; none is fine only for bearer-header clients.

    Browsers always send Origin and cannot set Authorization on a WebSocket, so this refuses
    cross-site WebSocket hijacking without locking out non-browser agents (PITFALLS P11).
    """
    origin = _header(scope, b"origin")
    if origin is None:
        return bearer_token(scope) is not None
    return origin in settings.HUB["ALLOWED_ORIGINS"]


class AgentConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        self.agent = None
        self.connection = None
        self.token_jti = None
        self.pushed_seq = 0
        self.pending_requests: dict[str, tuple[str | None, asyncio.TimerHandle]] = {}
        self._delivered: list[int] = []
        self._flush_task = None
        self._timers: list[asyncio.TimerHandle] = []
        self._last_touch = 0.0
        self._last_group_join = 0.0
        self.hub = settings.HUB
        client = self.scope.get("client") or ("", 0)
        request_source.set(str(client[0] or ""))
        if not origin_allowed(self.scope):
            await self.close()
            return
        await self.accept()
        token = bearer_token(self.scope)
        if token is not None:
            await self._authenticate(token, ref=None)
        else:
            self._later(self.hub["AUTH_TIMEOUT"], self._auth_timed_out)

    # --- Session lifecycle --------------------------------------------------------------------

    def _later(self, delay: float, coroutine_function, *args) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(delay, lambda: asyncio.ensure_future(coroutine_function(*args)))
        self._timers.append(handle)
        return handle

    async def _auth_timed_out(self):
        if self.agent is None:
            await self._close(protocol.CLOSE_AUTH_TIMEOUT, "authentication timed out")

    async def _close(self, code: int, detail: str):
        try:
            await self.send_json(protocol.error_frame(protocol.NOT_AUTHENTICATED, detail))
        except Exception:  # the socket may already be gone
            pass
        await self.close(code)

    async def _authenticate(self, token: str, *, ref):
        try:
            principal = await database_sync_to_async(agent_services.principal_from_access_token)(
                token
            )
        except agent_services.TokenRejected as exc:
            code = protocol.CLOSE_FORBIDDEN if exc.code.startswith("agent_") else protocol.CLOSE_NOT_AUTHENTICATED
            await self.send_json(protocol.error_frame(protocol.NOT_AUTHENTICATED, exc.detail, ref=ref))
            await self.close(code)
            return
        if principal.agent is None:
            await self._close(protocol.CLOSE_FORBIDDEN, "operators cannot connect as agents")
            return
        self.agent = principal.agent
        self.token_jti = principal.token_jti
        expires_in = (principal.token_expires_at - timezone.now()).total_seconds()
        self._later(max(expires_in, 0), self._close, protocol.CLOSE_NOT_AUTHENTICATED, "token expired")
        self.groups.append(agent_group(self.agent.pk))
        await self.channel_layer.group_add(agent_group(self.agent.pk), self.channel_name)
        self._last_group_join = time.monotonic()
        welcome, frames = await self._open_session()
        await self.send_json(welcome)
        await self._push(frames)

    @database_sync_to_async
    def _open_session(self):
        client = self.scope.get("client") or ("", 0)
        self.connection = agent_services.connection_open(
            agent=self.agent,
            channel_name=self.channel_name,
            server=server_name(),
            remote_addr=str(client[0] or ""),
            user_agent=_header(self.scope, b"user-agent") or "",
        )
        self._last_touch = time.monotonic()
        # Read the counter before the backlog: anything committed after it shows up in either.
        self.pushed_seq = (
            Mailbox.objects.filter(agent=self.agent).values_list("last_seq", flat=True).first() or 0
        )
        pending = services.pending_count(recipient=self.agent)
        frames = services.pending_frames(recipient=self.agent, limit=REPLAY_PAGE)
        welcome = protocol.welcome_frame(
            agent_id=self.agent.agent_id,
            session_id=self.connection.session_id,
            heartbeat_interval=self.hub["HEARTBEAT_INTERVAL"],
            pending=pending,
            server_time=timezone.now(),
        )
        return welcome, frames

    async def disconnect(self, code):
        for handle in self._timers:
            handle.cancel()
        for _ref, handle in self.pending_requests.values():
            handle.cancel()
        if self.connection is not None:
            await self._flush_delivered()
            await database_sync_to_async(agent_services.connection_closed)(
                connection=self.connection, code=code
            )

    # --- Frames in ------------------------------------------------------------------------------

    async def receive(self, text_data=None, bytes_data=None):
        raw = text_data if text_data is not None else bytes_data
        ref = None
        try:
            frame = protocol.parse_frame(
                raw,
                max_frame_bytes=self.hub["MAX_FRAME_BYTES"],
                max_payload_bytes=self.hub["MAX_PAYLOAD_BYTES"],
            )
            ref = frame["ref"]
            if self.agent is None:
                await self._receive_unauthenticated(frame)
                return
            await self._seen()
            await getattr(self, "frame_" + frame["type"])(frame)
        except protocol.ProtocolError as exc:
            await self.send_json(exc.frame())
        except agent_services.HubError as exc:
            await self.send_json(protocol.error_frame(exc.code, exc.detail, ref=ref))
        except DatabaseError:
            logger.exception("database unavailable while handling a frame")
            await self.send_json(
                protocol.error_frame(
                    protocol.UNAVAILABLE, "storage is unavailable; retry", ref=ref, retry_after=1
                )
            )
        except Exception:
            logger.exception("frame handler failed", extra={"agent_id": getattr(self.agent, "agent_id", None)})
            await self.send_json(protocol.error_frame(protocol.INTERNAL, "internal error", ref=ref))

    async def _receive_unauthenticated(self, frame):
        if frame["type"] != "auth":
            await self._close(protocol.CLOSE_NOT_AUTHENTICATED, "authenticate first")
            return
        await self._authenticate(frame["token"], ref=frame["ref"])

    async def _seen(self):
        """Record liveness at most twice per heartbeat interval, and keep group membership fresh."""
        now = time.monotonic()
        if now - self._last_touch >= self.hub["HEARTBEAT_INTERVAL"] / 2:
            self._last_touch = now
            await database_sync_to_async(agent_services.connection_seen)(connection=self.connection)
        if now - self._last_group_join >= self.hub["GROUP_REFRESH_SECONDS"]:
            # channels-redis forgets group members after group_expiry (PITFALLS P3).
            self._last_group_join = now
            await self.channel_layer.group_add(agent_group(self.agent.pk), self.channel_name)

    async def frame_auth(self, frame):
        raise protocol.ProtocolError(protocol.INVALID_FRAME, "type: already authenticated", ref=frame["ref"], field="type")

    async def frame_heartbeat(self, frame):
        await self.send_json(protocol.heartbeat_ack_frame(ref=frame["ref"], server_time=timezone.now()))

    async def _accept(self, frame, **kwargs):
        accepted = await database_sync_to_async(services.message_send)(
            sender=self.agent,
            payload=frame["payload"],
            client_id=frame.get("client_id"),
            ttl=frame.get("ttl"),
            **kwargs,
        )
        await self.send_json(
            protocol.accepted_frame(
                ref=frame["ref"],
                message_id=accepted.message_id,
                status=accepted.status,
                recipients=accepted.recipients,
                duplicate=accepted.duplicate,
            )
        )
        return accepted

    async def frame_send(self, frame):
        await self._accept(frame, kind=Message.Kind.DIRECT, to=frame["to"])

    async def frame_broadcast(self, frame):
        await self._accept(frame, kind=Message.Kind.BROADCAST)

    async def frame_publish(self, frame):
        await self._accept(frame, kind=Message.Kind.TOPIC, topic=frame["topic"])

    async def frame_subscribe(self, frame):
        await database_sync_to_async(services.topic_subscribe)(agent=self.agent, topic=frame["topic"])
        await self.send_json(protocol.topic_frame("subscribed", ref=frame["ref"], topic=frame["topic"]))

    async def frame_unsubscribe(self, frame):
        await database_sync_to_async(services.topic_unsubscribe)(agent=self.agent, topic=frame["topic"])
        await self.send_json(protocol.topic_frame("unsubscribed", ref=frame["ref"], topic=frame["topic"]))

    async def frame_request(self, frame):
        timeout = min(frame["timeout"] or self.hub["REQUEST_TIMEOUT"], self.hub["MAX_REQUEST_TIMEOUT"])
        recipient = await database_sync_to_async(services.request_recipient)(
            requester=self.agent, to=frame["to"], capability=frame["capability"]
        )
        accepted = await self._accept(
            {**frame, "ttl": timeout}, kind=Message.Kind.REQUEST, to=recipient
        )
        message_id = str(accepted.message_id)
        handle = self._later(timeout, self._request_timed_out, message_id)
        self.pending_requests[message_id] = (frame["ref"], handle)

    async def _request_timed_out(self, message_id: str):
        pending = self.pending_requests.pop(message_id, None)
        if pending is not None:
            await self.send_json(
                protocol.error_frame(
                    protocol.TIMEOUT, f"no reply to request {message_id} in time", ref=pending[0],
                    message_id=message_id,
                )
            )

    async def frame_reply(self, frame):
        await database_sync_to_async(services.reply_send)(
            replier=self.agent, in_reply_to=frame["in_reply_to"], payload=frame["payload"]
        )

    async def frame_ack(self, frame):
        acked = await database_sync_to_async(services.deliveries_ack)(
            recipient=self.agent, message_ids=frame["message_ids"], up_to_seq=frame["up_to_seq"]
        )
        if frame["ref"] is not None:
            await self.send_json({"type": "acked", "ref": frame["ref"], "acked": acked})

    # --- Events from the channel layer --------------------------------------------------------

    async def hub_deliver(self, event):
        for frame in event["frames"]:
            seq = frame["seq"]
            if seq <= self.pushed_seq:
                continue  # already sent by a replay
            if seq != self.pushed_seq + 1:
                # A nudge was lost or overtaken: the database has the rows in order.
                await self._replay()
                continue
            await self.send_json(frame)
            self.pushed_seq = seq
            self._delivered.append(seq)
        self._schedule_flush()

    async def hub_replay(self, event):
        """Send every due unacknowledged message again (the redelivery sweep asked)."""
        await self._replay(after_seq=0)

    async def _replay(self, after_seq: int | None = None):
        await self._flush_delivered()
        cursor = self.pushed_seq if after_seq is None else after_seq
        while True:
            frames = await database_sync_to_async(services.pending_frames)(
                recipient=self.agent, after_seq=cursor, limit=REPLAY_PAGE
            )
            await self._push(frames)
            if len(frames) < REPLAY_PAGE:
                return
            cursor = frames[-1]["seq"]

    async def _push(self, frames):
        for frame in frames:
            await self.send_json(frame)
            self.pushed_seq = max(self.pushed_seq, frame["seq"])

    async def hub_response(self, event):
        pending = self.pending_requests.pop(event["in_reply_to"], None)
        if pending is None:
            return  # another socket of this agent asked, or the request timed out
        ref, handle = pending
        handle.cancel()
        await self.send_json(
            protocol.response_frame(
                ref=ref, in_reply_to=event["in_reply_to"], sender=event["from"], payload=event["payload"]
            )
        )

    async def hub_close(self, event):
        jti = event.get("token_jti")
        if jti is not None and jti != self.token_jti:
            return
        await self._close(event["code"], "connection closed by the hub")

    # --- Delivered bookkeeping ------------------------------------------------------------------

    def _schedule_flush(self):
        if self._delivered and self._flush_task is None:
            self._flush_task = asyncio.ensure_future(self._flush_after_delay())

    async def _flush_after_delay(self):
        await asyncio.sleep(DELIVERED_FLUSH_DELAY)
        self._flush_task = None
        await self._flush_delivered()

    async def _flush_delivered(self):
        if not self._delivered:
            return
        seqs, self._delivered = self._delivered, []
        try:
            await database_sync_to_async(services.deliveries_mark_delivered)(
                recipient_id=self.agent.pk, seqs=seqs
            )
        except DatabaseError:
            # The rows stay queued and are replayed: at least once, never lost.
            logger.warning("could not record deliveries", exc_info=True)

    # --- JSON ---------------------------------------------------------------------------------

    @classmethod
    async def encode_json(cls, content):
        return orjson.dumps(content).decode()

