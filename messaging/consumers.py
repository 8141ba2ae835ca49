"""The agent WebSocket: authentication, frames in, deliveries out.

Handlers stay thin: each validated frame calls a service through `database_sync_to_async`, and
every failure becomes an `error` frame so one bad frame never ends the connection (PITFALLS P5).
"""

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson
from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from agents import services as agent_services
from agents.live import agent_group
from agents.models import Agent, Connection
from contexts.consumers import ContextWatchMixin
from ops import telemetry
from ops.lean_server import InputQueue
from security.ratelimit import TokenBucket
from security.services import request_source

from . import batch, protocol, services
from .engine import engine
from .layer import ChannelLayer
from .models import Message

logger = logging.getLogger(__name__)

# After frames arrive through the channel layer, check the mailbox this much later (seconds).
CATCH_UP_DELAY = 0.05
# Sends and acks of one socket waiting for their commit at most; beyond it the socket reads no
# further frame until the oldest is answered.
MAX_IN_FLIGHT = 64
REPLAY_PAGE = 500
# The database cannot be reached: the client should come back later (RFC 6455 "Try Again Later").
CLOSE_TRY_AGAIN_LATER = 1013
# Database failures a retry can cure: lost connections, lock timeouts, a server restarting. Other
# DatabaseErrors (bad SQL, constraint bugs) are internal errors, not "unavailable".
TRANSIENT_DATABASE_ERRORS = (OperationalError, InterfaceError)


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


def _next_event(source, *args) -> Callable[[], asyncio.Future]:
    """A callable giving a future of the next event from `source` (an ASGI receive, or a channel
    layer's receive with its channel): without a task of its own where the source hands out
    futures (daphne's input queue, ops/lean_server.py; our channel layer, messaging/layer.py)."""
    owner = getattr(source, "__self__", None)
    if isinstance(owner, InputQueue) and source.__func__ is InputQueue.get:
        return owner.next_event
    if isinstance(owner, ChannelLayer) and source.__func__ is ChannelLayer.receive:
        return functools.partial(owner.next_message, *args)
    return lambda: asyncio.ensure_future(source(*args))


class TokenExpiries:
    """One timer for all the sockets of an event loop whose tokens run out at the same instant.

    An access token's expiry is a whole second (JWT `exp`), so sockets that authenticated within
    one second of each other with tokens of one lifetime share it: instead of a closure, a
    TimerHandle and a set entry of its own (about 480 bytes per socket), each socket is an entry
    of its instant's set. When the timer fires, every socket still in the set closes, as each
    socket's own timer closed it.
    """

    def __init__(self):
        # (loop, expiry as a POSIX timestamp) -> (timer, consumers)
        self._due: dict[tuple, tuple[asyncio.TimerHandle, set]] = {}

    def add(self, consumer, expires_at: datetime) -> tuple:
        """Close `consumer` when `expires_at` is reached (at once if it has been); the key to
        `discard` it with."""
        loop = asyncio.get_running_loop()
        key = (loop, expires_at.timestamp())
        due = self._due.get(key)
        if due is None:
            delay = max((expires_at - timezone.now()).total_seconds(), 0)
            due = self._due[key] = (loop.call_later(delay, self._expire, key), set())
        due[1].add(consumer)
        return key

    def discard(self, consumer, key: tuple) -> None:
        due = self._due.get(key)
        if due is None:
            return
        due[1].discard(consumer)
        if not due[1]:
            due[0].cancel()
            del self._due[key]

    def _expire(self, key: tuple) -> None:
        _, consumers = self._due.pop(key)
        for consumer in consumers:
            consumer._token_expired()


token_expiries = TokenExpiries()


class AgentConsumer(ContextWatchMixin, AsyncJsonWebsocketConsumer):
    # Frame budgets per agent, shared by that agent's sockets on this server process.
    _buckets: dict[int, TokenBucket] = {}

    # Per-socket state that every socket starts with alike, read from the class until a socket
    # sets its own (an attribute written on a socket is that socket's, as before).
    token_jti = None
    pushed_seq = 0
    _refused_in_a_row = 0
    _in_flight = 0
    _catch_up_task = None
    _last_touch = 0.0
    _last_group_join = 0.0
    # Made on first use: an idle socket has no timer (its token's expiry is one of
    # `token_expiries`) and no task, and two empty sets were 432 bytes of it.
    _timers: set[asyncio.TimerHandle] | None = None
    _tasks: set[asyncio.Task] | None = None
    _expiry: tuple | None = None  # its key in token_expiries
    # What the socket keeps of its agent's and its connection's rows (see `agent`).
    _db = None
    _agent_pk: int | None = None
    _agent_id: str | None = None
    _connection_pk: int | None = None
    _connection = None  # the whole row, while the session opens
    _sender = None  # the Agent of the socket's sends, once it has sent

    async def __call__(self, scope, receive, send):
        """Channels' AsyncConsumer.__call__ (4.x), waiting on the socket and the channel layer
        with a future each instead of a task each: an idle socket holds no task and no
        suspended coroutine of its own beyond this one (29.3 → 26.7 KB per idle socket, bench
        idle with 3,000 sockets)."""
        self.scope = scope
        del scope  # this frame stays suspended for the socket's life: self.scope alone holds it
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        sources = [_next_event(receive)]
        if self.channel_layer is not None:
            # Channels' __call__ also keeps a `channel_receive` for its own loop, which this one
            # replaces: nothing reads it (about 250 bytes per socket).
            self.channel_name = await self.channel_layer.new_channel()
            sources.append(_next_event(self.channel_layer.receive, self.channel_name))
        self.base_send = send
        loop = asyncio.get_running_loop()
        # daphne's input queue, which hands a frame to `receive_now` while this socket waits.
        queue = getattr(receive, "__self__", None)
        if not isinstance(queue, InputQueue):
            queue = None
        # Awaited while no source has an event; whichever gets one first wakes it. A source's
        # future gets the callback once, not once per wait.
        signal = None

        def wake(_):
            if queue is not None:
                queue.idle_reader = None
            if signal is not None and not signal.done():
                signal.set_result(None)

        def next_from(index):
            future = sources[index]()
            if not future.done():
                future.add_done_callback(wake)
            return future

        waiting = [next_from(index) for index in range(len(sources))]
        try:
            while True:
                if not any(future.done() for future in waiting):
                    signal = loop.create_future()
                    if queue is not None:
                        # Frames read at once run with what this task has set so far: the
                        # session's log fields, the client's address for audits.
                        queue.reader_context = contextvars.copy_context()
                        queue.idle_reader = self
                    await signal
                    signal = None
                for index, future in enumerate(waiting):
                    if future.done():
                        waiting[index] = next_from(index)
                        await self.dispatch(future.result())
        except StopConsumer:
            pass
        finally:
            if queue is not None:
                queue.idle_reader = None
            for future in waiting:
                future.cancel()

    async def connect(self):
        self.pending_requests: dict[str, tuple[str | None, asyncio.TimerHandle]] = {}
        # Frames with a seq are written by one coroutine at a time (channel-layer handlers and the
        # delivered flush's catch-up), so a client sees each recipient's seq strictly increase.
        self._push_lock = asyncio.Lock()
        self.hub = settings.HUB
        client = self.scope.get("client") or ("", 0)
        request_source.set(str(client[0] or ""))
        allowed = origin_allowed(self.scope)
        token = bearer_token(self.scope)
        self.user_agent = _header(self.scope, b"user-agent") or ""
        # Nothing reads the handshake's headers after this, and one of them is a credential: the
        # socket keeps none of them (about 1.2 KB; daphne lets go of its own reference once the
        # socket is open, ops/lean_server.py).
        self.scope = {**self.scope, "headers": ()}
        if not allowed:
            await self.close()
            return
        await self.accept()
        telemetry.socket_opened(self)
        if token is not None:
            await self._authenticate(token, ref=None)
        else:
            self._later(self.hub["AUTH_TIMEOUT"], self._auth_timed_out)

    # --- The agent and the connection ----------------------------------------------------------

    @property
    def agent(self) -> Agent | None:
        """The socket's agent, None until it authenticates.

        Of the Agent row the socket keeps what it reads after its session opens: the primary key
        (every service it calls, frame budgets, acks, groups) and agent_id (logs, replies). Each
        read makes an Agent of those two fields; any other would be loaded from the database. The
        whole row, with the mailbox row that settled the session cached on it, and the whole
        Connection row were three model instances per socket. With the shared expiry timers
        (TokenExpiries), the sets made on first use and no `channel_receive`, bench idle (3,000
        sockets, alternating runs, SQLite): 17.9 and 17.5 -> 14.1 and 14.7 KB per socket.
        """
        if self._agent_pk is None:
            return None
        return Agent.from_db(self._db, ("id", "agent_id"), (self._agent_pk, self._agent_id))

    @agent.setter
    def agent(self, agent: Agent | None) -> None:
        self._sender = None
        if agent is None:
            self._agent_pk = self._agent_id = None
        else:
            self._agent_pk, self._agent_id, self._db = agent.pk, agent.agent_id, agent._state.db

    @property
    def connection(self) -> Connection | None:
        """The socket's Connection row, None until its session opens: the whole row while the
        session opens (the session's log lines take its session_id), then one of its primary key
        and its agent's, all that liveness and the close read of it."""
        if self._connection is not None:
            return self._connection
        if self._connection_pk is None:
            return None
        return Connection.from_db(
            self._db, ("id", "agent_id"), (self._connection_pk, self._agent_pk)
        )

    @connection.setter
    def connection(self, connection: Connection | None) -> None:
        self._connection = connection
        self._connection_pk = None if connection is None else connection.pk

    # --- Session lifecycle --------------------------------------------------------------------

    def _later(self, delay: float, coroutine_function, *args) -> asyncio.TimerHandle:
        """Run a coroutine after a delay unless the socket ends first (disconnect cancels it)."""
        loop = asyncio.get_running_loop()

        def fire():
            self._timers.discard(handle)
            self._background(coroutine_function(*args))

        handle = loop.call_later(delay, fire)
        if self._timers is None:
            self._timers = set()
        self._timers.add(handle)
        return handle

    def _cancel(self, handle: asyncio.TimerHandle) -> None:
        handle.cancel()
        if self._timers:
            self._timers.discard(handle)

    def _background(self, coroutine) -> None:
        """Run work outside any handler as a task of the socket's (disconnect cancels it)."""
        self._track(asyncio.ensure_future(self._guarded(coroutine)))

    def _track(self, task: asyncio.Task, done=None) -> None:
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(done or self._tasks.discard)

    def _token_expired(self) -> None:
        """Called by token_expiries when the token the socket authenticated with runs out."""
        self._expiry = None
        self._background(self._close(protocol.CLOSE_NOT_AUTHENTICATED, "token expired"))

    async def _guarded(self, coroutine):
        """Await work that runs outside any handler, logging what it raises (nobody else would)."""
        try:
            await coroutine
        except Exception:
            logger.exception("background task of a socket failed")

    async def _auth_timed_out(self):
        if self._agent_pk is None:
            await self._close(protocol.CLOSE_AUTH_TIMEOUT, "authentication timed out")

    async def _close(self, code: int, detail: str, *, ref=None, error_code=None):
        if error_code is None:
            forbidden = code == protocol.CLOSE_FORBIDDEN
            error_code = protocol.FORBIDDEN if forbidden else protocol.NOT_AUTHENTICATED
        with contextlib.suppress(Exception):  # the socket may already be gone
            await self.send_json(protocol.error_frame(error_code, detail, ref=ref))
        await self.close(code)

    async def _authenticate(self, token: str, *, ref):
        try:
            principal = await database_sync_to_async(agent_services.principal_from_access_token)(
                token
            )
        except agent_services.TokenRejected as exc:
            # A disabled or deregistered agent may not connect at all (4403); anything else about
            # the token is "authenticate again" (4401).
            forbidden = exc.code.startswith("agent_")
            await self._close(
                protocol.CLOSE_FORBIDDEN if forbidden else protocol.CLOSE_NOT_AUTHENTICATED,
                exc.detail,
                ref=ref,
            )
            return
        except TRANSIENT_DATABASE_ERRORS:
            await self._close_unavailable(ref)
            return
        if principal.agent is None:
            await self._close(
                protocol.CLOSE_FORBIDDEN, "operators cannot connect as agents", ref=ref
            )
            return
        self.agent = principal.agent
        self.token_jti = principal.token_jti
        if await database_sync_to_async(self._over_connection_limit)():
            await self._close(
                protocol.CLOSE_CONNECTION_LIMIT,
                f"at most {self.hub['MAX_CONNECTIONS_PER_AGENT']} open connections per agent",
                ref=ref,
                error_code=protocol.FORBIDDEN,
            )
            self.agent = None
            return
        self._expiry = token_expiries.add(self, principal.token_expires_at)
        try:
            self.groups.append(agent_group(self._agent_pk))
            await self.channel_layer.group_add(agent_group(self._agent_pk), self.channel_name)
            self._last_group_join = time.monotonic()
            # Quiet acks and delivered marks this process still holds (from the agent's socket
            # that closed just now, say) are committed before the backlog is read.
            await engine().write_records_now()
            welcome, frames = await self._open_session()
        except Exception:
            # Without the database or the layer this socket could neither deliver nor be closed by
            # the hub; the client reconnects later and gets everything from the database then.
            logger.exception("could not open a session")
            await self._close_unavailable(ref)
            return
        telemetry.session_opened(self)
        self._connection = None  # the rest of the row is not read again
        async with self._push_lock:
            await self.send_json(welcome)
            # From now on frames for this socket come straight from this process's writer.
            engine().attach(self)
            await self._push(frames)
            if len(frames) == REPLAY_PAGE:
                # The backlog is longer than one page: the rest follows, still oldest first.
                await self._replay(after_seq=frames[-1]["seq"])

    async def _close_unavailable(self, ref):
        await self._close(
            CLOSE_TRY_AGAIN_LATER,
            "the hub cannot reach its storage; reconnect later",
            ref=ref,
            error_code=protocol.UNAVAILABLE,
        )

    def _over_connection_limit(self) -> bool:
        open_count = self.agent.connections.open().count()
        return open_count >= self.hub["MAX_CONNECTIONS_PER_AGENT"]

    @database_sync_to_async
    def _open_session(self):
        client = self.scope.get("client") or ("", 0)
        agent = self.agent
        self.connection = agent_services.connection_open(
            agent=agent,
            channel_name=self.channel_name,
            server=server_name(),
            remote_addr=str(client[0] or ""),
            user_agent=self.user_agent,
        )
        self._last_touch = time.monotonic()
        # Settle the counter after the connection row is visible and before reading the backlog:
        # a send in flight now is in the backlog; a later one sees this socket and nudges it. So
        # every seq up to here arrives with the backlog, and every later one by a nudge.
        self.pushed_seq = services.mailbox_last_seq(recipient=agent, settle=True)
        # Every delivery takes its seq from the mailbox: an agent that was never given one has no
        # backlog to read (the first session of every new agent; the read was a fifth of the
        # server's CPU per connect, bench idle).
        frames = (
            services.pending_frames(recipient=agent, limit=REPLAY_PAGE) if self.pushed_seq else []
        )
        # The first page is the whole backlog unless it is full: count only a longer one.
        pending = (
            len(frames) if len(frames) < REPLAY_PAGE else services.pending_count(recipient=agent)
        )
        welcome = protocol.welcome_frame(
            agent_id=agent.agent_id,
            session_id=self.connection.session_id,
            heartbeat_interval=self.hub["HEARTBEAT_INTERVAL"],
            pending=pending,
            server_time=timezone.now(),
        )
        return welcome, frames

    async def disconnect(self, code):
        if self._expiry is not None:
            token_expiries.discard(self, self._expiry)
            self._expiry = None
        for handle in self._timers or ():
            handle.cancel()
        self._timers = None
        for task in list(self._tasks or ()):
            task.cancel()  # a timer that fired just now must not write to a closed socket
        for _ref, handle in self.pending_requests.values():
            handle.cancel()
        self.pending_requests.clear()
        if self._catch_up_task is not None:
            self._catch_up_task.cancel()
            self._catch_up_task = None
        engine().detach(self)
        engine().write_records_now()
        if self.connection is not None:
            await database_sync_to_async(agent_services.connection_closed)(
                connection=self.connection, code=code
            )
        telemetry.socket_closed(self, code)  # last: a graceful shutdown waits for this

    # --- Frames in ------------------------------------------------------------------------------

    def receive_now(self, event) -> bool:
        """Handle a send, publish, broadcast, ack or heartbeat frame at once, from daphne's read
        of it, while the socket waits for events with nothing in hand (ops/lean_server.py,
        InputQueue): no future, task step or coroutine of its own, which were about a fifth of
        the event loop's time on the direct benchmark. False for anything else, which the socket
        reads the coroutine way (`websocket_receive`), with the frame parsed here kept in
        `event["frame"]` so that it is not parsed twice."""
        text = event.get("text")
        if (
            text is None
            or event["type"] != "websocket.receive"
            or self._agent_pk is None
            or self._in_flight >= MAX_IN_FLIGHT
            or not self._writes_now()
        ):
            return False
        try:
            frame = self._parse(text)
        except protocol.ProtocolError as exc:
            self._write_now(exc.frame())
            return True
        now = time.monotonic()
        if (
            frame["type"] not in AT_ONCE
            or now - self._last_group_join >= self.hub["GROUP_REFRESH_SECONDS"]
            or not self._bucket().take()[0]  # a refusal is answered the coroutine way
        ):
            event["frame"] = frame
            return False
        self._refused_in_a_row = 0
        telemetry.frame_in(frame["type"])
        self._touch_if_due(now)
        try:
            self._handle_now(frame)
        except Exception:  # as `_answering` answers any failure, and the socket lives on
            self._write_now(self._internal_error(frame["ref"]))
        return True

    def _handle_now(self, frame) -> None:
        kind = frame["type"]
        if kind == "ack":
            self._ack_now(frame)
        elif kind == "heartbeat":
            self._write_now(self._heartbeat_ack(frame))
        else:
            self._accept_now(frame, **_send_fields(frame))

    async def websocket_receive(self, message):
        frame = message.get("frame")
        if frame is None:
            await super().websocket_receive(message)
            return
        telemetry.frame_in(frame["type"])
        await self._answering(frame["ref"], self._handle(frame))

    def _parse(self, raw) -> dict:
        return protocol.parse_frame(
            raw,
            max_frame_bytes=self.hub["MAX_FRAME_BYTES"],
            max_payload_bytes=self.hub["MAX_PAYLOAD_BYTES"],
        )

    async def receive(self, text_data=None, bytes_data=None):
        try:
            frame = self._parse(text_data if text_data is not None else bytes_data)
        except protocol.ProtocolError as exc:
            await self.send_json(exc.frame())
            return
        telemetry.frame_in(frame["type"])
        await self._answering(frame["ref"], self._handle(frame))

    async def _handle(self, frame):
        if self._agent_pk is None:
            await self._receive_unauthenticated(frame)
            return
        if not await self._admit(frame["ref"]):
            return
        await self._seen()
        await getattr(self, "frame_" + frame["type"])(frame)

    def _answer_later(self, ref, coroutine) -> None:
        """Answer a frame once its commit is done, while this socket reads the next frames."""
        self._in_flight += 1
        self._track(asyncio.ensure_future(self._answering(ref, coroutine)), self._answered)

    def _answered(self, task) -> None:
        """A frame in flight is answered: its task, or its commit's future, is done."""
        self._in_flight -= 1
        self._tasks.discard(task)

    async def _wait_for_room(self) -> None:
        while self._in_flight >= MAX_IN_FLIGHT and self._tasks:
            await asyncio.wait(list(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def _answering(self, ref, coroutine) -> None:
        """Await a frame's work; every failure becomes an error frame and the socket lives on."""
        try:
            await coroutine
        except protocol.ProtocolError as exc:
            await self.send_json(exc.frame())
        except agent_services.HubError as exc:
            extra = getattr(exc, "extra", None) or {}
            await self.send_json(protocol.error_frame(exc.code, exc.detail, ref=ref, **extra))
        except TRANSIENT_DATABASE_ERRORS:
            # Nothing was accepted: the send's transaction rolled back, so a retry is safe (and
            # with an "id" it is deduplicated if the commit did happen after all).
            logger.exception("database unavailable while handling a frame")
            await self.send_json(
                protocol.error_frame(
                    protocol.UNAVAILABLE, "storage is unavailable; retry", ref=ref, retry_after=1
                )
            )
        except Exception:
            await self.send_json(self._internal_error(ref))

    def _internal_error(self, ref) -> dict:
        """Log the failure being handled; the error frame that answers it."""
        logger.exception("frame handler failed", extra={"agent_id": self._agent_id})
        return protocol.error_frame(protocol.INTERNAL, "internal error", ref=ref)

    def _bucket(self) -> TokenBucket:
        bucket = self._buckets.get(self._agent_pk)
        if bucket is None:
            bucket = self._buckets[self._agent_pk] = TokenBucket(
                rate=self.hub["WS_RATE"], burst=self.hub["WS_BURST"]
            )
        return bucket

    async def _admit(self, ref) -> bool:
        """Spend a token from the agent's bucket; refuse the frame, or end the socket on abuse."""
        allowed, retry_after = self._bucket().take()
        if allowed:
            self._refused_in_a_row = 0
            return True
        self._refused_in_a_row += 1
        if self._refused_in_a_row >= self.hub["WS_ABUSE_LIMIT"]:
            await self._close(
                protocol.CLOSE_RATE_LIMIT,
                "rate limit abused",
                ref=ref,
                error_code=protocol.RATE_LIMITED,
            )
            return False
        await self.send_json(
            protocol.error_frame(
                protocol.RATE_LIMITED,
                "too many frames; slow down",
                ref=ref,
                retry_after=round(retry_after, 3),
            )
        )
        return False

    async def _receive_unauthenticated(self, frame):
        if frame["type"] != "auth":
            await self._close(protocol.CLOSE_NOT_AUTHENTICATED, "authenticate first")
            return
        await self._authenticate(frame["token"], ref=frame["ref"])

    async def _seen(self):
        """Record liveness at most twice per heartbeat interval, and keep group membership fresh."""
        now = time.monotonic()
        self._touch_if_due(now)
        if now - self._last_group_join >= self.hub["GROUP_REFRESH_SECONDS"]:
            # channels-redis forgets group members after group_expiry (PITFALLS P3).
            self._last_group_join = now
            await self.channel_layer.group_add(agent_group(self._agent_pk), self.channel_name)

    def _touch_if_due(self, now: float) -> None:
        if now - self._last_touch >= self.hub["HEARTBEAT_INTERVAL"] / 2:
            self._last_touch = now
            engine().touch(self._connection_pk, self._agent_pk)

    async def frame_auth(self, frame):
        raise protocol.ProtocolError(
            protocol.INVALID_FRAME, "type: already authenticated", ref=frame["ref"], field="type"
        )

    async def frame_heartbeat(self, frame):
        await self.send_json(self._heartbeat_ack(frame))

    def _heartbeat_ack(self, frame) -> dict:
        return protocol.heartbeat_ack_frame(ref=frame["ref"], server_time=timezone.now())

    def _sending_agent(self) -> Agent:
        """The agent, as its sends carry it: made on the first send and kept, since a socket
        that sends tends to go on (making one was 3 µs of each send, about 4% of the event
        loop's time on the direct benchmark); a socket that never sends holds none."""
        if self._sender is None:
            self._sender = self.agent
        return self._sender

    def _submit(self, frame, **kwargs) -> asyncio.Future:
        return engine().send(
            batch.Outgoing(
                sender=self._sending_agent(),
                payload=frame["payload"],
                client_id=frame.get("client_id"),
                ttl=frame.get("ttl"),
                source=request_source.get(),
                context=contextvars.copy_context(),
                **kwargs,
            )
        )

    async def _accept_later(self, frame, **kwargs):
        """Queue a send for the next commit and read on; `accepted` follows the commit."""
        await self._wait_for_room()
        if not self._writes_now():
            self._answer_later(frame["ref"], self._accepted(frame, self._submit(frame, **kwargs)))
            return
        self._accept_now(frame, **kwargs)

    def _accept_now(self, frame, **kwargs) -> None:
        """`_accept_later` for a socket that writes at once and has room: answered from the
        future's callback, with no task of its own (each was about 6% of the event loop's time
        on the direct benchmark)."""
        future = self._submit(frame, **kwargs)
        self._in_flight += 1
        self._track(future, functools.partial(self._accepted_now, frame))

    def _accepted_now(self, frame, future) -> None:
        self._answered(future)
        if future.cancelled():
            return  # the socket closed
        if future.exception() is not None:
            self._answer_later(frame["ref"], self._accepted(frame, future))  # as any failure
            return
        self._write_now(_accepted_frame(frame, future.result()))

    async def _accepted(self, frame, future):
        accepted = await future
        await self.send_json(_accepted_frame(frame, accepted))
        return accepted

    async def frame_send(self, frame):
        await self._accept_later(frame, **_send_fields(frame))

    frame_broadcast = frame_publish = frame_send

    async def frame_subscribe(self, frame):
        topic = frame["topic"]
        await database_sync_to_async(services.topic_subscribe)(agent=self.agent, topic=topic)
        await self.send_json(protocol.topic_frame("subscribed", ref=frame["ref"], topic=topic))

    async def frame_unsubscribe(self, frame):
        topic = frame["topic"]
        await database_sync_to_async(services.topic_unsubscribe)(agent=self.agent, topic=topic)
        await self.send_json(protocol.topic_frame("unsubscribed", ref=frame["ref"], topic=topic))

    async def frame_request(self, frame):
        timeout = min(
            frame["timeout"] or self.hub["REQUEST_TIMEOUT"], self.hub["MAX_REQUEST_TIMEOUT"]
        )
        recipient = await database_sync_to_async(services.request_recipient)(
            requester=self.agent, to=frame["to"], capability=frame["capability"]
        )
        # Awaited here, not later: the timer must be set before this socket handles a response.
        request = {**frame, "ttl": timeout}
        accepted = await self._accepted(
            request, self._submit(request, kind=Message.Kind.REQUEST, to=recipient)
        )
        message_id = str(accepted.message_id)
        previous = self.pending_requests.pop(message_id, None)
        if previous is not None:
            self._cancel(previous[1])  # a repeated request id: one timer per request
        handle = self._later(timeout, self._request_timed_out, message_id)
        self.pending_requests[message_id] = (frame["ref"], handle)

    async def _request_timed_out(self, message_id: str):
        pending = self.pending_requests.pop(message_id, None)
        if pending is not None:
            await self.send_json(
                protocol.error_frame(
                    protocol.TIMEOUT,
                    f"no reply to request {message_id} in time",
                    ref=pending[0],
                    message_id=message_id,
                )
            )

    async def frame_reply(self, frame):
        await database_sync_to_async(services.reply_send)(
            replier=self.agent, in_reply_to=frame["in_reply_to"], payload=frame["payload"]
        )

    async def frame_ack(self, frame):
        if frame["ref"] is not None:
            await self._wait_for_room()
        self._ack_now(frame)

    def _ack_now(self, frame) -> None:
        ack = batch.Ack(
            self._agent_pk,
            frame["message_ids"],
            frame["up_to_seq"],
            answer=frame["ref"] is not None,
            seen_seq=self.pushed_seq,
        )
        if not ack.answer:
            engine().ack_quietly(ack)
            return
        self._answer_later(frame["ref"], self._acked(frame["ref"], engine().ack(ack)))

    async def _acked(self, ref, future):
        acked = await future
        await self.send_json({"type": "acked", "ref": ref, "acked": acked})

    # --- Events from the channel layer --------------------------------------------------------

    async def dispatch(self, message):
        """Handle one event; a failing channel-layer handler is logged and the socket lives on.

        Channels' own dispatch first runs close_old_connections in the database thread: a thread
        hop per frame that queues behind whatever that thread is doing (here, the batch writer),
        so each socket read one frame per commit. Every database call of this consumer goes
        through database_sync_to_async, which closes stale connections itself (PITFALLS P10).

        Channels closes the socket on any exception from a handler (PITFALLS P5). For client
        frames `receive` already answers errors; for hub events there is nobody to answer, and
        whatever the event was about is in the database.
        """
        handler = getattr(self, get_handler_name(message), None)
        if message["type"].startswith("websocket."):
            await handler(message)
            return
        try:
            if handler is None:
                raise ValueError(f"no handler for {message['type']!r}")
            await handler(message)
        except Exception:
            logger.exception(
                "channel layer event failed", extra={"event_type": str(message.get("type"))[:100]}
            )

    async def hub_deliver(self, event):
        await self._deliver(event["frames"])
        # A burst beyond the layer's capacity loses its newest nudges, and no later nudge shows
        # the gap: once the burst is written, ask the mailbox what else there is.
        if self._catch_up_task is None:
            self._catch_up_task = asyncio.ensure_future(self._catch_up_after_delay())

    def deliver_local(self, frames) -> None:
        """Take frames from this process's writer, which hands them over after the commit: written
        at once where the socket can be and no coroutine holds the push lock, else by a task."""
        if not self._push_lock.locked() and self._writes_now():
            frames = self._deliver_now(frames)
            if not frames:
                return
        self._background(self._deliver(frames))

    def _deliver_now(self, frames) -> list:
        """Write the frames that follow the last seq pushed; return the rest from a gap on."""
        written = []
        rest = []
        for index, frame in enumerate(frames):
            seq = frame["seq"]
            if seq <= self.pushed_seq:
                continue  # already sent by a replay
            if seq != self.pushed_seq + 1:
                rest = frames[index:]  # for `_deliver`, which catches up first
                break
            self._write_now(frame)
            self.pushed_seq = seq
            written.append(seq)
        if written:
            engine().mark_delivered(self._agent_pk, written)
        return rest

    async def _deliver(self, frames):
        written = []
        async with self._push_lock:
            for frame in frames:
                seq = frame["seq"]
                if seq <= self.pushed_seq:
                    continue  # already sent by a replay
                if seq != self.pushed_seq + 1:
                    # A nudge was lost or overtaken: the database has the rows in order.
                    await self._catch_up()
                    continue
                await self.send_json(frame)
                self.pushed_seq = seq
                written.append(seq)
        if written:
            engine().mark_delivered(self._agent_pk, written)

    async def hub_replay(self, event):
        """Send queued and due unacknowledged messages again (the redelivery sweep asked)."""
        if self._agent_pk is None:
            return
        # What it replays may lie below the seq the engine knows settled (an operator's
        # redelivery of a dead letter): the acks that follow read everything again.
        engine().forget_settled(self._agent_pk)
        # The sweep reaches this socket through its own channel; re-join the agent's group too,
        # which a Redis restarted without its data has forgotten, so live nudges arrive again.
        await self.channel_layer.group_add(agent_group(self._agent_pk), self.channel_name)
        self._last_group_join = time.monotonic()
        if event.get("delivered_before") is not None:
            cutoff = datetime.fromtimestamp(float(event["delivered_before"]), tz=UTC)
        else:
            cutoff = timezone.now() - timedelta(seconds=self.hub["REDELIVERY_DELAY"])
        async with self._push_lock:
            await self._replay(after_seq=0, delivered_before=cutoff)

    async def _catch_up(self):
        """Push whatever the database holds beyond this socket's last seq (hold the push lock).

        Every seq up to the mailbox counter is committed once the counter shows it (a send holds
        the mailbox row until it commits), so after the replay the socket has seen all of them.
        """
        last_seq = await database_sync_to_async(services.mailbox_last_seq)(recipient=self.agent)
        if last_seq > self.pushed_seq:
            await self._replay(after_seq=self.pushed_seq)
            self.pushed_seq = max(self.pushed_seq, last_seq)

    async def _replay(self, *, after_seq: int, delivered_before=None):
        """Push pending rows after a seq in pages, oldest first (hold the push lock)."""
        cursor = after_seq
        while True:
            frames = await database_sync_to_async(services.pending_frames)(
                recipient=self.agent,
                after_seq=cursor,
                limit=REPLAY_PAGE,
                delivered_before=delivered_before,
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
        self._cancel(handle)
        await self.send_json(
            protocol.response_frame(
                ref=ref,
                in_reply_to=event["in_reply_to"],
                sender=event["from"],
                payload=event["payload"],
            )
        )

    async def hub_close(self, event):
        jti = event.get("token_jti")
        if jti is not None and jti != self.token_jti:
            return
        code = event["code"]
        if code in (1000, 1001):
            await self.close(code)  # an ordinary end (operator disconnect, liveness sweep)
            return
        await self._close(code, "connection closed by the hub")

    # --- Catching up ---------------------------------------------------------------------------

    async def _catch_up_after_delay(self):
        try:
            await asyncio.sleep(CATCH_UP_DELAY)
            async with self._push_lock:
                self._catch_up_task = None
                await self._catch_up()
        except TRANSIENT_DATABASE_ERRORS:
            logger.warning("could not catch up from the database", exc_info=True)
        except Exception:
            logger.exception("catching up failed")

    # --- JSON ---------------------------------------------------------------------------------

    async def send_json(self, content, close=False):
        if close or self._write_now(content) is None:
            await super().send_json(content, close)

    def _writes_now(self) -> bool:
        """Whether the server lets this socket write frames outside any coroutine."""
        return getattr(self.base_send, "write_text", None) is not None

    def _write_now(self, content) -> bool | None:
        """Write a frame at once where the server lets the socket (daphne's ProtocolSend,
        ops/lean_server.py): True if written, False if the socket is no longer open. None where
        it must take the ASGI way (send_json)."""
        write = getattr(self.base_send, "write_text", None)
        if write is None:
            return None
        telemetry.frame_out(content)
        return write(orjson.dumps(content))

    @classmethod
    async def encode_json(cls, content):
        telemetry.frame_out(content)
        return orjson.dumps(content).decode()


# The frames a socket that waits for events handles at once (`receive_now`).
AT_ONCE = frozenset({"send", "broadcast", "publish", "ack", "heartbeat"})


def _send_fields(frame) -> dict:
    """What a send, broadcast or publish frame asks of `_submit`."""
    kind = frame["type"]
    if kind == "send":
        return {"kind": Message.Kind.DIRECT, "to": frame["to"]}
    if kind == "broadcast":
        return {"kind": Message.Kind.BROADCAST}
    return {"kind": Message.Kind.TOPIC, "topic": frame["topic"]}


def _accepted_frame(frame, accepted: services.Accepted) -> dict:
    return protocol.accepted_frame(
        ref=frame["ref"],
        message_id=accepted.message_id,
        status=accepted.status,
        recipients=accepted.recipients,
        duplicate=accepted.duplicate,
    )
