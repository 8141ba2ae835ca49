"""Costs of the daphne server process that it does not need: two per socket, one per frame.

Per socket (measured with tracemalloc on 2,000 idle agent sockets, bench idle): each application
instance gets an asyncio.Queue as its `receive`, which is four deques (about 3.3 KB) for a queue
that holds one or two events at a time. `InputQueue` keeps the two operations daphne and the
application use, `put_nowait` and `get`, in two short lists.

Per socket, too: after the WebSocket upgrade the HTTP channel that read the handshake stays the
socket's registered producer. It does nothing in that role any more (it considers itself busy
with the upgrade request for good), but it keeps itself and the request, with its headers and
body buffer, alive for the socket's lifetime. It is unregistered once the socket is handed over.

Per socket, too: once a socket is open, autobahn still keeps its opening handshake (the
request's bytes, its parsed headers and the parts of its first line, the response it sent, what
it negotiated from) and daphne the request and the headers it cleaned for the scope. Nothing
reads them again but daphne, for the request's path in the access log, so when the socket opens
they are dropped and the request is replaced by its path (`OpenedRequest`): 10,185 -> 6,626
traced bytes per socket through autobahn's own handshake, with a 300-byte bearer token (the
scope's reference to the headers is the consumer's to drop, messaging/consumers.py).

Per socket, too: autobahn copies 29 protocol options from the factory onto each socket as it
connects, which takes the socket's attribute dict to 99 entries (3.3 KB). The factory's
protocol class holds them instead (`share_options`), and autobahn copies none: 70 entries in
1.6 KB, 10,185 -> 8,441 traced bytes per socket, and a handshake took about 150 µs less CPU
(about 350 -> 210 µs). Nor is the list of those options pretty-printed for a debug line at
every connect (about 0.1 ms more).

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

Per socket, too: what is left of autobahn's attribute dict once a socket is open is still
about 57 entries, past the 30 that CPython shares between instances of a class, so each socket
has a dict of its own of 128 slots (1.6 KB). 36 of the entries hold the same value on every
open socket (autobahn's `_connectionMade` sets them all: flags False, timers and close codes None,
counters 0); the protocol class holds those (`OPEN_DEFAULTS`), the socket drops its copies when
it opens, and the dict is rebuilt to fit the rest: 22 entries in 64 slots (832 bytes), which
still hold the 33 of a socket that has read frames since (autobahn sets some of them again per
frame; each is then the socket's own, as before). autobahn's send queue, a deque of 760 bytes
from the start, is empty and stays so under daphne (it queues only chopped or synchronous
writes); it is a list (`SendQueue`, 56 bytes) from then on. bench idle, 3,000 sockets, SQLite:
20.7, 19.3 and 19.2 -> 17.9 and 17.5 KB per socket (both changes, alternating runs).

Per written frame, too: a frame the application sends went through Channels' send, daphne's
handle_reply and serverSend (which encoded the text again) and autobahn's sendMessage, sendFrame
and sendData: about 12 µs and 15% of the event loop's time on the direct benchmark, for two
frames per message. The `send` daphne gives a WebSocket's application (`ProtocolSend`) can also
write a text frame at once (`write_text`): the frame's header and its already encoded payload in
one write to the transport. What autobahn would do otherwise (compression, fragments, masking, a
queued chopped write, frame logging, a size limit, timings) takes autobahn's own way; autobahn's
traffic counters, which nothing here reads, are not kept for these frames.

Per read frame, too: autobahn reads a client's frame through processData, onFrameBegin,
onMessageBegin, onMessageFrameBegin, onFrameData, onMessageFrameData, onFrameEnd,
onMessageFrameEnd and onMessageEnd, each setting the socket's per-frame state, before daphne's
onMessage gets the text. Data that holds nothing but whole, final, masked text frames of up to
65,535 bytes, on an open socket between messages, is read at once instead
(`read_whole_text_frames`): each frame unmasked and handed to onMessage, with autobahn's size
limits and its restart of the keep-alive ping on traffic. Anything else (a control, binary or
fragmented frame, a part of a frame, a frame over a limit, a socket that compresses or logs
frames) goes to autobahn from that frame on, as it came.

Measured and left out: reading the options from the factory through a fallback lookup, instead
of from the protocol class, saved as much per socket but cut the connect rate by a third.
"""

import asyncio
import contextvars
import sys
from collections import deque
from functools import partial

_installed = False
# Frames up to this many payload bytes are unmasked by SmallFrameMasker.
SMALL_FRAME = 1024


# WebSocketProtocol.STATE_OPEN and SEND_STATE_GROUND.
STATE_OPEN = 3
SEND_STATE_GROUND = 0
# The header of an unmasked final text frame of n bytes, for n up to 125.
_SHORT_TEXT_HEADERS = [bytes((0x81, n)) for n in range(126)]


class InputQueue:
    """The part of asyncio.Queue an ASGI `receive` needs: put_nowait() and awaiting get()."""

    __slots__ = ("_getters", "_items", "_loop", "idle_reader", "reader_context")

    def __init__(self):
        self._items: list = []
        self._getters: list[asyncio.Future] = []
        # The loop it is read on, once read: asyncio.get_running_loop() makes a system call.
        self._loop: asyncio.AbstractEventLoop | None = None
        # An application waiting for events with nothing in hand may take an event at once,
        # from daphne's read of it: its `receive_now(event)`, run in `reader_context` (the
        # context variables of the application's task when it began to wait), says whether it
        # did.
        self.idle_reader = None
        self.reader_context: contextvars.Context | None = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item) -> None:
        reader = self.idle_reader
        if reader is not None:
            if self.reader_context.run(reader.receive_now, item):
                return
            self.idle_reader = None  # busy with this event from now on
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(item)
                return
        self._items.append(item)

    def next_event(self) -> asyncio.Future:
        """A future of the next event, done at once if one is waiting: a consumer can wait on
        it without a task of its own (messaging.consumers.AgentConsumer)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
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


class ProtocolSend:
    """The `send` of a WebSocket's application (daphne's Server.handle_reply for its socket),
    which can also write a text frame outside any coroutine: `write_text`."""

    __slots__ = ("protocol", "server")

    def __init__(self, server, protocol):
        self.server = server
        self.protocol = protocol

    def __call__(self, message):
        return self.server.handle_reply(self.protocol, message)

    def write_text(self, data: bytes) -> bool:
        """Send `data`, UTF-8, as one text message; False if the socket is not open (nothing is
        written: daphne drops what an application sends to a closed socket, too)."""
        return write_text_frame(self.protocol, data)


def write_text_frame(protocol, data: bytes) -> bool:
    """Write `data` as the single unmasked text frame autobahn's sendMessage writes for it."""
    if protocol.state != STATE_OPEN:
        return False
    size = len(data)
    if (
        protocol._perMessageCompress is not None
        or protocol.send_queue
        or protocol.send_state != SEND_STATE_GROUND
        or protocol.autoFragmentSize
        or protocol.maskServerFrames
        or protocol.logFrames
        or protocol.logOctets
        or protocol.trackedTimings
        or 0 < protocol.maxMessagePayloadSize < size
    ):
        protocol.sendMessage(data, False)  # autobahn's way, which knows what each of these needs
        return True
    if size <= 125:
        header = _SHORT_TEXT_HEADERS[size]
    elif size <= 0xFFFF:
        header = b"\x81\x7e" + size.to_bytes(2, "big")
    else:
        header = b"\x81\x7f" + size.to_bytes(8, "big")
    protocol.transport.write(header + data)
    return True


def read_whole_text_frames(protocol, data: bytes) -> bytes:
    """Hand each whole text frame at the start of `data` to the socket's onMessage; return the
    rest, from the first thing autobahn must read itself (b"" once all is read)."""
    if (
        protocol.state != STATE_OPEN
        or protocol.data
        or protocol.current_frame is not None
        or protocol.inside_message
        or protocol.failedByMe
        or protocol._perMessageCompress is not None
        or protocol.utf8validateIncoming
        or not protocol.applyMask
        or protocol.logOctets
        or protocol.logFrames
        or protocol.trackedTimings
        or protocol._listeners
        or protocol._parent is not None
    ):
        return data
    frame_limit, message_limit = protocol.maxFramePayloadSize, protocol.maxMessagePayloadSize
    size = len(data)
    at = 0
    read = False
    while at + 6 <= size and data[at] == 0x81 and data[at + 1] & 0x80:  # FIN, text, masked
        length = data[at + 1] & 0x7F
        start = at + 6
        if length == 126:
            length = int.from_bytes(data[at + 2 : at + 4], "big")
            start = at + 8
            if length < 126:
                break  # not the shortest length encoding: autobahn fails the socket for it
        elif length == 127:
            break  # over 65,535 bytes
        end = start + length
        if end > size or 0 < frame_limit < length or 0 < message_limit < length:
            break
        key = data[start - 4 : start]
        payload = data[start:end]
        if length:
            payload = unmask((key * (length // 4 + 1))[:length], payload)
        at = end
        read = True
        protocol.onMessage(payload, False)
        if protocol.state != STATE_OPEN:
            break  # failed or closing now: the rest is autobahn's to read in that state
    if read and protocol.autoPingTimeoutCall and protocol.autoPingRestartOnAnyTraffic:
        protocol._cancelAutoPingTimeoutCall()  # what autobahn does at the end of any frame
    return data[at:] if at else data


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
    _release_handshake_leftovers()
    _options_on_the_protocol_class()
    _small_frame_masker()
    _whole_text_frames_read_at_once()


def _lean_input_queue() -> None:
    from daphne.server import Server

    original = Server.create_application

    def create_application(server, protocol, scope):
        # daphne's own method, with InputQueue in place of asyncio.Queue, and a ProtocolSend for
        # a WebSocket's application in place of a partial of handle_reply.
        assert "application_instance" not in server.connections[protocol]
        input_queue = InputQueue()
        scope.setdefault("asgi", {"version": "3.0"})
        if scope.get("type") == "websocket":
            send = ProtocolSend(server, protocol)
        else:
            send = partial(server.handle_reply, protocol)
        application_instance = server.application(scope=scope, receive=input_queue.get, send=send)
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
    # The options a socket starts with, for a debug line: about 0.1 ms of every connect.
    protocol.pformat = _plain


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


# What autobahn and daphne keep of a WebSocket's opening handshake and read no more once the
# socket is open: the request (its raw bytes, parsed headers and parts of its first line), the
# response, what the handshake negotiated from, and the headers daphne cleaned for the scope.
HANDSHAKE_LEFTOVERS = (
    "http_request_data",
    "http_status_line",
    "http_headers",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "http_response_data",
    "websocket_origin",
    "websocket_protocols",
    "websocket_extensions",
    "_wskey",
    "clean_headers",
    "application_deferred",
)


class OpenedRequest:
    """What daphne reads of a WebSocket's handshake request once it is open: the path, for the
    access log."""

    __slots__ = ("path",)

    def __init__(self, path: str):
        self.path = path


def _release_handshake_leftovers() -> None:
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.onOpen

    def onOpen(protocol):
        original(protocol)
        protocol.request = OpenedRequest(protocol.request.path)
        attributes = protocol.__dict__
        for name in HANDSHAKE_LEFTOVERS:
            attributes.pop(name, None)
        _drop_open_defaults(protocol)

    onOpen.original = original
    WebSocketProtocol.onOpen = onOpen


# What every open socket of autobahn's (and daphne's) holds alike: what `_connectionMade` and the
# handshake set, read back through the protocol class once the socket drops its own copy. Only
# immutable values: a socket that changes one sets its own, as autobahn does.
OPEN_DEFAULTS = {
    "state": 3,  # WebSocketProtocol.STATE_OPEN
    "send_state": 0,  # SEND_STATE_GROUND
    "data": b"",
    "triggered": False,
    "_perMessageCompress": None,
    "trackedTimings": None,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False,
    "failedByMe": False,
    "droppedByMe": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasServerConnectionDropTimeout": False,
    "wasOpenHandshakeTimeout": False,
    "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "serverConnectionDropTimeoutCall": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "autoPingTimeoutCall": None,
    "autoPingPending": None,
    "autoPingPendingCall": None,
    "autoPingPendingSeq": 0,
    "autoPingPendingSent": None,
    "websocket_version": 13,
    "websocket_protocol_in_use": None,
    "inside_message": False,
    "current_frame": None,
    "protocol_to_accept": None,
    "root_path": "",
    "_raw_query_string": b"",
}


class SendQueue(list):
    """autobahn's send queue as a list: the deque it makes takes 760 bytes before it holds
    anything, for a queue that under daphne stays empty (it queues only chopped or synchronous
    writes). The same operations: append, popleft, len."""

    __slots__ = ()

    def popleft(self):
        return self.pop(0)


def _drop_open_defaults(protocol) -> None:
    """Drop what an open socket holds alike with every other (`OPEN_DEFAULTS`) where its class
    holds the same, make its empty send queue a `SendQueue`, and rebuild its attribute dict to
    fit what is left (a dict does not shrink as entries leave it)."""
    cls = type(protocol)
    if "_options_shared" not in vars(cls):
        return  # not a class of share_options: it has no defaults to read back
    attributes = protocol.__dict__
    for name, default in OPEN_DEFAULTS.items():
        if _same(attributes.get(name, attributes), default) and _same(getattr(cls, name), default):
            del attributes[name]
    queue = attributes.get("send_queue")
    if type(queue) is deque and not queue:
        attributes["send_queue"] = SendQueue()
    protocol.__dict__ = dict(attributes.items())


def _same(value, default) -> bool:
    return type(value) is type(default) and value == default


def _options_on_the_protocol_class() -> None:
    from daphne.ws_protocol import WebSocketFactory

    original_set = WebSocketFactory.setProtocolOptions
    original_reset = WebSocketFactory.resetProtocolOptions

    def setProtocolOptions(factory, *args, **kwargs):
        original_set(factory, *args, **kwargs)
        share_options(factory)

    def resetProtocolOptions(factory):
        original_reset(factory)
        share_options(factory)

    setProtocolOptions.original, resetProtocolOptions.original = original_set, original_reset
    WebSocketFactory.setProtocolOptions = setProtocolOptions
    WebSocketFactory.resetProtocolOptions = resetProtocolOptions


def share_options(factory) -> None:
    """Give the factory a protocol class of its own that holds the factory's options: autobahn
    copies an option onto a socket only where the socket does not have it already.

    A new class whenever the options change, so a socket keeps the options it started with, as
    with autobahn's copies. An option the protocol class sets itself stays as it is: autobahn
    lets it win over the factory's.
    """
    protocol = factory.protocol
    if "_options_shared" in vars(protocol):
        protocol = protocol.__base__
    options = {
        name: _class_attribute(getattr(factory, name))
        for name in protocol.CONFIG_ATTRS
        if not hasattr(protocol, name)
    }
    # Read back through the class by open sockets that drop their own (_drop_open_defaults).
    defaults = {name: value for name, value in OPEN_DEFAULTS.items() if not hasattr(protocol, name)}
    factory.protocol = type(
        protocol.__name__,
        (protocol,),
        {
            "__module__": protocol.__module__,
            "__qualname__": protocol.__qualname__,
            "_options_shared": True,
            **defaults,
            **options,
        },
    )


def _class_attribute(value):
    """`value` as a class attribute that reads back as itself through an instance: a function
    (perMessageCompressionAccept) would otherwise read back as a method of the socket."""
    return staticmethod(value) if hasattr(type(value), "__get__") else value


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
        return unmask((self._mask * ((start + length) // 4 + 1))[start : start + length], data)


def unmask(key: bytes, data: bytes) -> bytes:
    """`data` XOR `key`, both of one length: in Python's integers, at C speed."""
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
        len(data), "little"
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


def _whole_text_frames_read_at_once() -> None:
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol._dataReceived

    def _dataReceived(protocol, data):
        rest = read_whole_text_frames(protocol, data)
        if rest:
            original(protocol, rest)

    _dataReceived.original = original
    WebSocketProtocol._dataReceived = _dataReceived
