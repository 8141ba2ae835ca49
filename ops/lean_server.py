"""Costs of the daphne server process that it does not need: two per socket, one per frame.

Per socket (measured with tracemalloc on 2,000 idle agent sockets, bench idle): each application
instance gets an asyncio.Queue as its `receive`, which is four deques (about 3.3 KB) for a queue
that holds one or two events at a time. `InputQueue` keeps the two operations daphne and the
application use, `put_nowait` and `get`, in two short lists.

Per socket, too: after the WebSocket upgrade the HTTP channel that read the handshake stays the
socket's registered producer. It does nothing in that role any more (it considers itself busy
with the upgrade request for good), but it keeps itself and the request, with its headers and
body buffer, alive for the socket's lifetime. It is unregistered once the socket is handed over.

Per frame: autobahn builds the arguments of its debug log lines (`hltype`, `hlval`: names styled
with terminal colours) for every frame it sends or reads, whether or not debug logging is on;
that was about 5% of the hub's CPU time in the direct benchmark (and, for every read, 2.3% of the
event loop's time at 1,000 messages/s, in autobahn's Twisted adapter). Plain values are passed
instead; a debug log still shows them, uncoloured.

Per text message: autobahn checks its UTF-8 as it reads it (a validator reset per message, fed per
frame: 3.5% of the event loop's time at 1,000 messages/s), then daphne decodes it, which checks it
again. autobahn's check is off; a message that does not decode fails the socket the way
autobahn's check did (`_invalid_payload`: status 1007, and the connection dropped).

Per message, too: autobahn fires a "message" signal for the socket's observers, a Deferred built
for every message; daphne has none, so it is skipped (`_no_message_signal_without_listeners`).

Per written frame: Twisted registered the socket for writability and wrote on the next turn of
the loop, then unregistered it; accepted sockets now write at the end of the turn that wrote to
them (`_write_without_polling`).

Per frame, too: autobahn unmasks each client frame with a masker from its native (CFFI)
extension, built for the frame: two C allocations, a copy in and a copy out, about 2.9 µs for a
120-byte payload. For frames up to SMALL_FRAME bytes a masker in Python integers does the same
in 0.6 µs. Direct benchmark (SQLite, three alternating runs each): 8,376-8,804 -> 8,579-9,404
messages/s, 125-131 -> 115-126 µs of server CPU per message.

Measured and left out: reading autobahn's ~60 protocol options from the factory instead of
copying them onto each socket saved about 2 KB per socket but cut the connect rate by a third.
"""

import asyncio
import sys
from functools import partial

_installed = False
# Frames up to this many payload bytes are unmasked by SmallFrameMasker.
SMALL_FRAME = 1024


class InputQueue:
    """The part of asyncio.Queue an ASGI `receive` needs: put_nowait() and awaiting get()."""

    __slots__ = ("_getters", "_items")

    def __init__(self):
        self._items: list = []
        self._getters: list[asyncio.Future] = []

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item) -> None:
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(item)
                return
        self._items.append(item)

    def next_event(self) -> asyncio.Future:
        """A future of the next event, done at once if one is waiting: a consumer can wait on
        it without a task of its own (messaging.consumers.AgentConsumer)."""
        future = asyncio.get_running_loop().create_future()
        if self._items:
            future.set_result(self._items.pop(0))
        else:
            self._getters.append(future)
        return future

    def get_nowait(self):
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    async def get(self):
        getter = self.next_event()
        try:
            return await getter
        except asyncio.CancelledError:
            if getter.done() and not getter.cancelled():
                # Handed an event in the same instant the caller was cancelled: keep it first.
                self._items.insert(0, getter.result())
            elif getter in self._getters:
                self._getters.remove(getter)
            raise


def install() -> None:
    """Under daphne, use InputQueue for applications and plain debug-log arguments."""
    global _installed
    if _installed or "daphne.server" not in sys.modules:
        return
    _installed = True
    _lean_input_queue()
    _plain_debug_log_arguments()
    _utf8_checked_once()
    _no_message_signal_without_listeners()
    _write_without_polling()
    _release_upgraded_http_requests()
    _small_frame_masker()


def _lean_input_queue() -> None:
    from daphne.server import Server

    original = Server.create_application

    def create_application(server, protocol, scope):
        # daphne's own method, with InputQueue in place of asyncio.Queue.
        assert "application_instance" not in server.connections[protocol]
        input_queue = InputQueue()
        scope.setdefault("asgi", {"version": "3.0"})
        application_instance = server.application(
            scope=scope,
            receive=input_queue.get,
            send=partial(server.handle_reply, protocol),
        )
        if protocol not in server.connections:
            return None
        server.connections[protocol]["application_instance"] = asyncio.ensure_future(
            application_instance, loop=asyncio.get_event_loop()
        )
        return input_queue

    create_application.original = original
    Server.create_application = create_application


def _plain(value, *args, **kwargs):
    return value


def _plain_debug_log_arguments() -> None:
    from autobahn.twisted import websocket
    from autobahn.websocket import protocol

    for module in (protocol, websocket):
        module.hltype = _plain
        module.hlval = _plain


def _utf8_checked_once() -> None:
    from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol

    original_init, original_on_message = WebSocketFactory.__init__, WebSocketProtocol.onMessage

    def __init__(factory, *args, **kwargs):
        original_init(factory, *args, **kwargs)
        factory.setProtocolOptions(utf8validateIncoming=False)

    def onMessage(protocol, payload, isBinary):
        # daphne's own, which decodes text frames: what autobahn's check would have refused
        # fails the socket as autobahn does.
        try:
            original_on_message(protocol, payload, isBinary)
        except UnicodeDecodeError as exc:
            protocol._invalid_payload(f"encountered invalid UTF-8 in a text message: {exc.reason}")

    __init__.original, onMessage.original = original_init, original_on_message
    WebSocketFactory.__init__ = __init__
    WebSocketProtocol.onMessage = onMessage


def _release_upgraded_http_requests() -> None:
    from daphne.http_protocol import WebRequest

    original = WebRequest.process

    def process(request):
        original(request)
        channel = request.channel
        if request.transport is not None or channel is None:
            return  # plain HTTP: the channel goes on serving it
        # Handed over to a WebSocket. The HTTP channel is still the socket's registered
        # producer, a no-op from here on (it is marked busy with this request for good), and
        # the only thing keeping it and the request alive.
        transport = channel.transport
        if getattr(transport, "producer", None) is channel:
            transport.unregisterProducer()

    process.original = original
    WebRequest.process = process


class SmallFrameMasker:
    """autobahn's masker interface (process, pointer, reset) for a frame's payload, which may
    arrive in several pieces: XOR with the 4-byte mask, repeated from the frame's start."""

    __slots__ = ("_mask", "_pointer")

    def __init__(self, mask: bytes):
        self._mask = bytes(mask)
        self._pointer = 0

    def pointer(self) -> int:
        return self._pointer

    def reset(self) -> None:
        self._pointer = 0

    def process(self, data: bytes) -> bytes:
        length = len(data)
        start = self._pointer & 3
        self._pointer += length
        key = (self._mask * ((start + length) // 4 + 1))[start : start + length]
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
            length, "little"
        )


def _small_frame_masker() -> None:
    from autobahn.websocket import protocol

    original = protocol.create_xor_masker

    def create_xor_masker(mask, length=None):
        if length is not None and length <= SMALL_FRAME:
            return SmallFrameMasker(mask)
        return original(mask, length)

    create_xor_masker.original = original
    protocol.create_xor_masker = create_xor_masker


def _no_message_signal_without_listeners() -> None:
    """After handing a message to onMessage, autobahn fires its "message" signal for observers
    of the socket, building a Deferred (and a callback on it) for every message; daphne observes
    nothing, so a socket without observers skips it."""
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.onMessageEnd

    def onMessageEnd(protocol):
        if protocol._listeners or protocol._parent is not None:
            original(protocol)
            return
        # autobahn's own, less the signal.
        if not protocol.failedByMe:
            payload = b"".join(protocol.message_data)
            if protocol.trackedTimings:
                protocol.trackedTimings.track("onMessage")
            protocol._onMessage(payload, protocol.message_is_binary)
        protocol.message_data = None

    onMessageEnd.original = original
    WebSocketProtocol.onMessageEnd = onMessageEnd


def _write_without_polling() -> None:
    """Twisted writes a socket's buffered data once the event loop says the socket is writable:
    each write registers the socket for writability (`addWriter`), and the next turn of the loop
    writes and unregisters it. For a socket whose buffer has room, that is two changes to the
    loop's poller and a turn through Twisted's logging wrappers per frame. Accepted sockets
    instead write at the end of the loop turn that wrote to them (what that turn wrote goes out
    together, as before), and register for writability only when the kernel takes less than all.
    """
    from twisted.internet import tcp
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor as Reactor

    if hasattr(Reactor.addWriter, "original"):
        return  # installed already
    if not all(hasattr(Reactor, name) for name in ("_readOrWrite", "addWriter", "removeWriter")):
        return  # a Twisted whose internals differ: it polls as it always did
    original_add, original_remove = Reactor.addWriter, Reactor.removeWriter

    def addWriter(reactor, writer):
        if type(writer) is not tcp.Server or writer in reactor._writers:
            original_add(reactor, writer)
            return
        flushing = reactor.__dict__.setdefault("_flushing", set())
        if writer not in flushing:
            flushing.add(writer)
            reactor._asyncioEventloop.call_soon(_flush, reactor, writer)

    def removeWriter(reactor, writer):
        reactor.__dict__.get("_flushing", set()).discard(writer)
        original_remove(reactor, writer)

    def _flush(reactor, writer):
        flushing = reactor._flushing
        if writer not in flushing:
            return  # stopped writing meanwhile
        flushing.discard(writer)
        if not writer.connected:
            return
        # What the loop would do when the socket is writable: write, and close it if asked to.
        reactor._readOrWrite(writer, False)
        if writer.connected and (writer._tempDataLen or writer.offset < len(writer.dataBuffer)):
            original_add(reactor, writer)  # the rest when the socket can take it

    addWriter.original, removeWriter.original = original_add, original_remove
    Reactor.addWriter, Reactor.removeWriter = addWriter, removeWriter
