"""What ops/lean_server.py changes in daphne: the input queue, debug-log arguments, the HTTP
request a WebSocket was upgraded from, and what an open socket keeps of its handshake."""

import asyncio
import base64
import contextvars
import gc
import os
import random
import weakref

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ops import lean_server
from ops.lean_server import InputQueue, SmallFrameMasker


async def test_a_waiting_get_receives_the_next_event():
    queue = InputQueue()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait({"type": "websocket.connect"})
    assert await getter == {"type": "websocket.connect"}


async def test_a_queue_asks_asyncio_for_its_loop_once(loop_lookups):
    queue = InputQueue()
    for n in range(3):
        queue.put_nowait(n)
        assert await queue.next_event() == n
    assert loop_lookups == [1]  # each call is a getpid system call (Python 3.11)


class Reader:
    def __init__(self, takes):
        self.takes, self.taken = takes, []

    def receive_now(self, event) -> bool:
        if event in self.takes:
            self.taken.append(event)
            return True
        return False


async def test_an_idle_reader_takes_events_at_once_until_it_declines_one():
    queue = InputQueue()
    waiting = queue.next_event()
    queue.reader_context = contextvars.copy_context()
    queue.idle_reader = reader = Reader(takes={"a", "b", "d"})
    for event in ("a", "b", "c", "d"):
        queue.put_nowait(event)
    # "c" was declined: it and everything after it wait for the reader's coroutine, in order.
    assert reader.taken == ["a", "b"] and queue.idle_reader is None
    assert await waiting == "c" and await queue.next_event() == "d"


async def test_events_put_before_get_come_out_in_order():
    queue = InputQueue()
    for n in range(3):
        queue.put_nowait(n)
    assert queue.qsize() == 3
    assert [await queue.get() for _ in range(3)] == [0, 1, 2]
    assert queue.empty()
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()


async def test_a_cancelled_get_loses_no_event():
    queue = InputQueue()
    cancelled = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    queue.put_nowait("after")
    assert await asyncio.wait_for(queue.get(), 1) == "after"


async def test_an_event_handed_to_a_get_cancelled_at_once_is_kept_first():
    queue = InputQueue()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("first")  # resolves the getter's future...
    getter.cancel()  # ...but its task is cancelled before it runs again
    await asyncio.gather(getter, return_exceptions=True)
    queue.put_nowait("second")
    assert [await queue.get(), await queue.get()] == ["first", "second"]


@pytest.fixture
def daphne_installed(monkeypatch):
    from autobahn.twisted import websocket
    from autobahn.websocket import protocol
    from daphne.http_protocol import WebRequest
    from daphne.server import Server
    from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    monkeypatch.setattr(AsyncioSelectorReactor, "addWriter", AsyncioSelectorReactor.addWriter)
    monkeypatch.setattr(AsyncioSelectorReactor, "removeWriter", AsyncioSelectorReactor.removeWriter)
    monkeypatch.setattr(Server, "create_application", Server.create_application)
    monkeypatch.setattr(WebRequest, "process", WebRequest.process)
    monkeypatch.setattr(WebSocketFactory, "__init__", WebSocketFactory.__init__)
    monkeypatch.setattr(WebSocketProtocol, "onOpen", WebSocketProtocol.onOpen)
    for name in ("setProtocolOptions", "resetProtocolOptions"):
        monkeypatch.setattr(WebSocketFactory, name, getattr(WebSocketFactory, name))
    monkeypatch.setattr(protocol, "pformat", protocol.pformat)
    monkeypatch.setattr(WebSocketProtocol, "onMessage", WebSocketProtocol.onMessage)
    monkeypatch.setattr(WebSocketProtocol, "onMessageEnd", WebSocketProtocol.onMessageEnd)
    for module in (protocol, websocket):
        monkeypatch.setattr(module, "hltype", module.hltype)
        monkeypatch.setattr(module, "hlval", module.hlval)
    monkeypatch.setattr(protocol, "create_xor_masker", protocol.create_xor_masker)
    monkeypatch.setattr(WebSocketProtocol, "_dataReceived", WebSocketProtocol._dataReceived)
    monkeypatch.setattr(lean_server, "_installed", False)
    lean_server.install()


async def test_daphne_gives_each_application_an_input_queue(daphne_installed):
    from daphne.server import Server

    received = []

    async def application(scope, receive, send):
        received.append(await receive())

    server = Server.__new__(Server)
    server.application = application
    protocol = object()
    server.connections = {protocol: {}}
    queue = server.create_application(protocol, {"type": "websocket"})
    assert isinstance(queue, InputQueue)
    queue.put_nowait({"type": "websocket.connect"})
    await server.connections[protocol]["application_instance"]
    assert received == [{"type": "websocket.connect"}]


async def test_a_websocket_application_gets_a_send_that_can_also_write_at_once(daphne_installed):
    from daphne.server import Server

    sends = {}

    async def application(scope, receive, send):
        sends[scope["type"]] = send

    server = Server.__new__(Server)
    server.application = application
    replies = []

    async def handle_reply(protocol, message):
        replies.append((protocol, message))

    server.handle_reply = handle_reply
    for kind in ("websocket", "http"):
        protocol = object()
        server.connections = {protocol: {}}
        server.create_application(protocol, {"type": kind})
        await server.connections[protocol]["application_instance"]
        await sends[kind]({"type": f"{kind}.test"})
        assert replies.pop() == (protocol, {"type": f"{kind}.test"})  # daphne's handle_reply
    assert isinstance(sends["websocket"], lean_server.ProtocolSend)
    assert sends["websocket"].protocol is not None
    assert not hasattr(sends["http"], "write_text")


def test_autobahn_debug_log_arguments_are_passed_plain(daphne_installed):
    from autobahn.twisted import websocket
    from autobahn.util import hlval
    from autobahn.websocket import protocol

    for module in (protocol, websocket):
        assert module.hlval(42) == 42 and module.hltype(InputQueue) is InputQueue
    assert protocol.pformat([("logOctets", False)]) == [("logOctets", False)]
    assert hlval(42) != 42  # autobahn's own helper is untouched elsewhere


def test_text_messages_are_checked_for_utf8_once_by_daphnes_decoding(daphne_installed):
    from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol

    factory = WebSocketFactory(server_class=None)
    assert factory.utf8validateIncoming is False  # autobahn's incremental check is off

    refused = []
    socket = WebSocketProtocol.__new__(WebSocketProtocol)
    socket.muted = False
    socket.client_addr = ("127.0.0.1", 1)
    socket.application_queue = InputQueue()
    socket._invalid_payload = refused.append
    socket.onMessage("café".encode(), False)
    assert socket.application_queue.get_nowait() == {"type": "websocket.receive", "text": "café"}
    socket.onMessage(b"caf\xc3", False)  # cut inside a character
    assert socket.application_queue.empty()
    [reason] = refused  # failed as autobahn's own check fails it (1007)
    assert "invalid UTF-8" in reason


class FakeTransport:
    def __init__(self):
        self.producer = None

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


def handled_request(monkeypatch, *, upgrade: bool):
    """A request through the installed WebRequest.process, daphne's own part played by a stub
    that does what it does to the request and transport (Twisted's HTTP channel registers
    itself as the socket's producer when the connection is made)."""
    from daphne.http_protocol import WebRequest

    def daphne_process(request):
        if upgrade:
            request.transport = None  # handed to the WebSocket protocol

    monkeypatch.setattr(WebRequest, "process", daphne_process)
    lean_server._release_upgraded_http_requests()
    transport = FakeTransport()
    request = WebRequest.__new__(WebRequest)
    request.channel = type("Channel", (), {"transport": transport})()
    request.transport = transport
    transport.registerProducer(request.channel, True)
    WebRequest.process(request)
    return request, transport


def test_an_upgraded_socket_lets_go_of_its_http_channel_and_request(monkeypatch):
    request, transport = handled_request(monkeypatch, upgrade=True)
    assert transport.producer is None
    channel = weakref.ref(request.channel)
    request_ref = weakref.ref(request)
    del request
    gc.collect()
    assert channel() is None and request_ref() is None


def test_a_plain_http_request_keeps_its_channel_as_producer(monkeypatch):
    request, transport = handled_request(monkeypatch, upgrade=False)
    assert transport.producer is request.channel


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 63, 64, 125, 126, 127, 1000, 1024])
def test_the_small_frame_masker_unmasks_as_autobahn_does_in_any_pieces(length):
    from autobahn.websocket.xormasker import create_xor_masker

    rng = random.Random(length)
    mask, payload = rng.randbytes(4), rng.randbytes(length)
    expected = create_xor_masker(mask, length).process(payload)
    for cuts in ([], [1], [3, 7], sorted(rng.sample(range(1, length + 2), min(5, length)))):
        masker, pieces, at = SmallFrameMasker(mask), [], 0
        for cut in [*cuts, length]:
            pieces.append(masker.process(payload[at:cut]))
            at = max(at, min(cut, length))
            assert masker.pointer() == at
        assert b"".join(pieces) == expected


def test_daphne_unmasks_small_frames_with_it_and_large_ones_with_autobahns(daphne_installed):
    from autobahn.websocket import protocol

    assert isinstance(protocol.create_xor_masker(b"abcd", 100), SmallFrameMasker)
    assert not isinstance(protocol.create_xor_masker(b"abcd", 64 * 1024), SmallFrameMasker)


def test_a_message_fires_autobahns_signal_only_for_a_socket_with_observers(daphne_installed):
    from daphne.ws_protocol import WebSocketProtocol

    def socket_with_message():
        socket = WebSocketProtocol.__new__(WebSocketProtocol)
        socket.failedByMe, socket.trackedTimings, socket.message_is_binary = False, None, False
        socket.message_data = [b'{"type": ', b'"heartbeat"}']
        socket.handed = []
        socket._onMessage = lambda payload, is_binary: socket.handed.append((payload, is_binary))
        return socket

    unobserved = socket_with_message()
    unobserved.fire = None  # not called: the signal is skipped
    unobserved.onMessageEnd()
    assert unobserved.handed == [(b'{"type": "heartbeat"}', False)]
    assert unobserved.message_data is None

    observed = socket_with_message()
    observed.set_valid_events(["message"])
    seen = []
    observed.on("message", lambda payload, is_binary: seen.append(payload))
    observed.onMessageEnd()
    assert observed.handed == [(b'{"type": "heartbeat"}', False)]
    assert seen == [b'{"type": "heartbeat"}']  # autobahn's own, signal included


class HandshakeServer:
    """What daphne's WebSocket protocol asks of its server, with the access log recorded."""

    root_path = ""
    proxy_forwarded_address_header = None

    def __init__(self):
        self.logged = []
        self.scope = None

    def protocol_connected(self, protocol):
        pass

    def protocol_disconnected(self, protocol):
        pass

    def create_application(self, protocol, scope):
        self.scope = scope
        return InputQueue()

    def log_action(self, protocol, action, details):
        self.logged.append((action, details["path"]))


@pytest.fixture
def factory(daphne_installed):
    from daphne.ws_protocol import WebSocketFactory

    factory = WebSocketFactory(HandshakeServer(), server="Daphne")
    factory.setProtocolOptions(openHandshakeTimeout=0)  # no timer: no reactor runs here
    return factory


def opened_socket(factory):
    """A socket of `factory` through autobahn's opening handshake, accepted by the application."""
    socket = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    socket.makeConnection(StringTransport())
    socket._raw_query_string = b""  # from daphne's HTTP side
    key = base64.b64encode(os.urandom(16)).decode()
    socket.dataReceived(
        "GET /ws/agent/ HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Authorization: Bearer secret\r\n\r\n".encode()
    )
    socket.handle_reply({"type": "websocket.accept"})
    assert socket.state == socket.STATE_OPEN
    return socket


def test_an_open_socket_keeps_nothing_of_its_handshake_but_the_path(factory):
    socket = opened_socket(factory)
    assert not set(lean_server.HANDSHAKE_LEFTOVERS) & set(vars(socket))
    assert socket.request.path == "/ws/agent/"
    # The application got the headers in its scope; what it keeps of them is its own business.
    assert (b"authorization", b"Bearer secret") in factory.server_class.scope["headers"]

    socket.handle_reply({"type": "websocket.close", "code": 1000})
    socket.connectionLost(Failure(ConnectionDone()))
    assert factory.server_class.logged == [
        ("connecting", "/ws/agent/"),
        ("connected", "/ws/agent/"),
        ("disconnected", "/ws/agent/"),
    ]


def test_sockets_read_the_factorys_options_from_their_class_instead_of_copying_them(factory):
    from autobahn.websocket.protocol import WebSocketServerProtocol

    socket = opened_socket(factory)
    assert not set(WebSocketServerProtocol.CONFIG_ATTRS) & set(vars(socket))
    for name in WebSocketServerProtocol.CONFIG_ATTRS:
        # A function among them (perMessageCompressionAccept) reads back as itself.
        assert getattr(socket, name) is getattr(factory, name), name
    assert socket.utf8validateIncoming is False and socket.openHandshakeTimeout == 0


def test_a_socket_keeps_the_options_it_started_with_as_with_autobahns_copies(factory):
    socket = opened_socket(factory)
    factory.setProtocolOptions(maxFramePayloadSize=1000)
    assert socket.maxFramePayloadSize == 0
    assert opened_socket(factory).maxFramePayloadSize == 1000
    factory.resetProtocolOptions()
    assert opened_socket(factory).utf8validateIncoming is True  # autobahn's default again


def test_an_option_set_by_the_protocol_class_wins_as_in_autobahn(factory):
    from daphne.ws_protocol import WebSocketProtocol

    factory.protocol = type("Sized", (WebSocketProtocol,), {"maxFramePayloadSize": 7})
    factory.setProtocolOptions(maxFramePayloadSize=1000)
    assert opened_socket(factory).maxFramePayloadSize == 7


@pytest.fixture
def lean_writes(monkeypatch):
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    for name in ("addWriter", "removeWriter"):
        # Twisted's own, even where the server set-up of another test patched it already.
        method = getattr(AsyncioSelectorReactor, name)
        monkeypatch.setattr(AsyncioSelectorReactor, name, getattr(method, "original", method))
    lean_server._write_without_polling()


class Recorded:
    """A Twisted protocol that keeps what happens to its connection."""

    def __init__(self):
        self.lost = []

    def makeConnection(self, transport):
        self.transport = transport

    def connectionLost(self, reason):
        self.lost.append(reason)


def accepted_connection(reactor, protocol):
    """A tcp.Server (what daphne's listening port makes of an accepted socket) and its peer."""
    import socket

    from twisted.internet import tcp

    ours, peer = socket.socketpair()
    ours.setblocking(False)
    connection = tcp.Server(ours, protocol, ("127.0.0.1", 1), None, 1, reactor)
    protocol.makeConnection(connection)
    return connection, peer


async def receive_all(peer, size: int) -> bytes:
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        data += await loop.sock_recv(peer, size - len(data))
    return data


async def test_a_socket_with_room_is_written_at_the_end_of_the_turn_without_polling(lean_writes):
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    loop = asyncio.get_running_loop()
    reactor = AsyncioSelectorReactor(loop)
    polled = []
    original = loop.add_writer
    loop.add_writer = lambda fd, *args: (polled.append(fd), original(fd, *args))
    protocol = Recorded()
    connection, peer = accepted_connection(reactor, protocol)
    try:
        connection.write(b"one ")
        connection.write(b"two")
        assert await receive_all(peer, 7) == b"one two"  # both writes in one flush
        assert polled == [] and connection not in reactor.getWriters()

        # More than the kernel takes at once: the rest waits for writability, as before.
        big = bytes(range(256)) * 40_000
        connection.write(big)
        await asyncio.sleep(0)
        assert polled == [connection.fileno()]
        assert await receive_all(peer, len(big)) == big
        await asyncio.sleep(0.05)
        assert connection not in reactor.getWriters()

        # Closing after a write: the data goes out, then the connection is lost, once.
        connection.write(b"bye")
        connection.loseConnection()
        assert await receive_all(peer, 3) == b"bye"
        await asyncio.sleep(0.05)
        assert len(protocol.lost) == 1 and not connection.connected
    finally:
        loop.add_writer = original
        peer.close()


def test_an_open_socket_reads_what_every_socket_holds_alike_from_its_class(factory):
    from collections import deque

    from daphne.ws_protocol import WebSocketProtocol

    # What autobahn and daphne set per socket, from a socket that drops nothing.
    reference = factory.protocol.__base__
    assert not hasattr(reference, "_options_shared")
    socket = opened_socket(factory)
    assert not set(lean_server.OPEN_DEFAULTS) & set(vars(socket))
    for name, default in lean_server.OPEN_DEFAULTS.items():
        value = getattr(socket, name)
        assert type(value) is type(default) and value == default, name
    assert socket.state == WebSocketProtocol.STATE_OPEN
    assert isinstance(socket.send_queue, lean_server.SendQueue) and not socket.send_queue
    # The rest is as it was: the queue daphne feeds, the path, the close Deferred.
    assert isinstance(socket.application_queue, InputQueue) and socket.path == b"/ws/agent/"
    assert not socket.is_closed.called
    assert deque is not type(socket.send_queue)


def test_a_default_a_socket_sets_again_is_its_own(factory):
    first, second = opened_socket(factory), opened_socket(factory)
    first.handle_reply({"type": "websocket.close", "code": 1000})
    assert first.state == first.STATE_CLOSING and first.closedByMe is True
    assert first.localCloseCode == 1000
    assert second.state == second.STATE_OPEN and second.closedByMe is False
    assert second.localCloseCode is None
    assert type(second).closedByMe is False and type(second).state == second.STATE_OPEN
    first.connectionLost(Failure(ConnectionDone()))
    assert first.state == first.STATE_CLOSED and second.state == second.STATE_OPEN


def test_a_socket_of_a_class_without_the_defaults_keeps_its_own(factory):
    from daphne.ws_protocol import WebSocketProtocol

    socket = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    socket.__class__ = WebSocketProtocol  # daphne's own class: nothing to read back from
    socket.makeConnection(StringTransport())
    socket._raw_query_string = b""
    key = base64.b64encode(os.urandom(16)).decode()
    socket.dataReceived(
        "GET /ws/agent/ HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    socket.handle_reply({"type": "websocket.accept"})
    assert socket.state == socket.STATE_OPEN
    assert {"state", "closedByMe", "send_state"} <= set(vars(socket))


def test_the_send_queue_is_first_in_first_out_as_autobahns_deque():
    queue = lean_server.SendQueue()
    assert len(queue) == 0 and not queue
    queue.append((b"a", True))
    queue.append((b"b", False))
    assert len(queue) == 2
    assert queue.popleft() == (b"a", True) and queue.popleft() == (b"b", False)
    with pytest.raises(IndexError):
        queue.popleft()


def test_a_socket_queues_chopped_writes_and_writes_them_in_order(factory, monkeypatch):
    import txaio

    later = []
    monkeypatch.setattr(txaio, "call_later", lambda delay, function: later.append(function))
    socket = opened_socket(factory)
    written = len(socket.transport.value())
    socket.sendData(b"abcdef", chopsize=2)  # the first piece goes out at once
    socket.sendData(b"xy")  # behind the queued pieces
    assert socket.send_queue == [(b"cd", True), (b"ef", True), (b"xy", False)]
    while later:
        later.pop(0)()
    assert socket.transport.value()[written:] == b"abcdefxy"
    assert not socket.send_queue and socket.triggered is False


def written_by(socket, write) -> bytes:
    before = len(socket.transport.value())
    write()
    return socket.transport.value()[before:]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_a_text_frame_written_at_once_is_the_frame_autobahn_writes(factory, size):
    socket = opened_socket(factory)
    data = ("é" * size).encode()[:size]
    data = data.ljust(size, b"a")
    ours = written_by(socket, lambda: lean_server.ProtocolSend(None, socket).write_text(data))
    autobahns = written_by(socket, lambda: socket.sendMessage(data, False))
    assert ours == autobahns and ours.endswith(data) and len(ours) > size


def test_a_socket_that_is_not_open_is_written_nothing(factory):
    socket = opened_socket(factory)
    socket.sendClose(1000)  # closing: autobahn refuses to send a message now
    assert written_by(socket, lambda: lean_server.write_text_frame(socket, b"{}")) == b""
    assert lean_server.write_text_frame(socket, b"{}") is False


@pytest.mark.parametrize(
    "option",
    [{"autoFragmentSize": 4}, {"maskServerFrames": True}, {"logFrames": True}],
    ids=["fragments", "masked", "logged"],
)
def test_a_socket_with_options_autobahn_serves_itself_is_written_autobahns_way(
    factory, monkeypatch, option
):
    import random as autobahn_random

    socket, twin = opened_socket(factory), opened_socket(factory)
    for each in (socket, twin):
        vars(each).update(option)
    monkeypatch.setattr(autobahn_random, "getrandbits", lambda bits: 0x01020304)  # the mask
    data = b'{"type": "message"}'
    taken = []
    socket.sendMessage = lambda *args: (taken.append(args), type(socket).sendMessage(socket, *args))
    ours = written_by(socket, lambda: lean_server.write_text_frame(socket, data))
    autobahns = written_by(twin, lambda: twin.sendMessage(data, False))
    assert taken == [(data, False)] and ours == autobahns


def test_a_socket_with_queued_writes_is_written_after_them(factory, monkeypatch):
    import txaio

    later = []
    monkeypatch.setattr(txaio, "call_later", lambda delay, function: later.append(function))
    socket = opened_socket(factory)
    written = len(socket.transport.value())
    socket.sendData(b"abcd", chopsize=2)  # "cd" waits in the send queue
    lean_server.write_text_frame(socket, b"{}")
    while later:
        later.pop(0)()
    assert socket.transport.value()[written:] == b"abcd" + bytes((0x81, 2)) + b"{}"


# --- Whole text frames read at once --------------------------------------------------------------


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A frame as a client sends it: masked with a random key."""
    key = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = bytes((0x80 * fin | opcode, 0x80 | size))
    elif size < 65536:
        header = bytes((0x80 * fin | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 * fin | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    masked = bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))
    return header + key + masked


def text(size: int) -> bytes:
    """`size` bytes of valid UTF-8, two-byte characters among them."""
    return ("é" * size).encode()[: size - size % 2].ljust(size, b"a")


def application_events(socket) -> list:
    queue = socket.application_queue
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


def fed(socket, stream: bytes, pieces: list[int], *, at_once: bool) -> tuple[list, bytes, int]:
    """Feed `stream` in pieces to a socket, read at once or by autobahn alone; return what its
    application got, what the socket wrote and its state."""
    from daphne.ws_protocol import WebSocketProtocol

    read = WebSocketProtocol._dataReceived
    if not at_once:
        read = read.original
    if socket.transport.producer is None:
        socket.transport.producer = socket  # what the socket unregisters when it drops
    written = len(socket.transport.value())
    start = 0
    for end in [*pieces, len(stream)]:
        if end > start:
            read(socket, stream[start:end])
            start = end
    return application_events(socket), socket.transport.value()[written:], socket.state


STREAMS = {
    "text frames of every length encoding": b"".join(
        client_frame(1, text(size)) for size in (0, 1, 5, 125, 126, 127, 1000, 65535, 65536, 3)
    ),
    "control, binary and fragmented frames between text frames": b"".join(
        [
            client_frame(1, b'{"type": "send"}'),
            client_frame(9, b"ping"),
            client_frame(1, b'{"n": 1}'),
            client_frame(2, b"\x00\x01binary"),
            client_frame(1, b'{"part": ', fin=False),
            client_frame(0, b'"two"}'),
            client_frame(1, b"[]"),
            client_frame(10, b"pong"),
            client_frame(1, b'"last"'),
        ]
    ),
    "invalid UTF-8 in the middle": client_frame(1, b'"ok"')
    + client_frame(1, b"\xff\xfe")
    + client_frame(1, b'"never read"'),
    "a close in the middle": client_frame(1, b'"before"')
    + client_frame(8, (1000).to_bytes(2, "big"))
    + client_frame(1, b'"after"'),
    "an unmasked frame": bytes((0x81, 2)) + b"{}",
    "reserved bits set": bytes((0xC1,)) + client_frame(1, b"{}")[1:],
    "a length not in its shortest encoding": bytes((0x81, 0x80 | 126, 0, 5))
    + os.urandom(4)
    + b"abcde",
}


@pytest.mark.parametrize("stream", list(STREAMS), ids=list(STREAMS))
@pytest.mark.parametrize("split", ["whole", "random pieces", "byte by byte"])
def test_a_socket_reads_what_autobahn_reads_from_any_stream_in_any_pieces(factory, stream, split):
    data = STREAMS[stream]
    if split == "whole":
        pieces = []
    elif split == "byte by byte":
        pieces = list(range(1, len(data))) if len(data) < 5000 else list(range(1, 5000))
    else:
        pieces = sorted(random.sample(range(1, len(data)), min(12, len(data) - 1)))
    ours = fed(opened_socket(factory), data, pieces, at_once=True)
    autobahns = fed(opened_socket(factory), data, pieces, at_once=False)
    assert ours == autobahns
    assert ours[0], "the application got nothing: the stream tests nothing"


@pytest.mark.parametrize("limit", ["maxFramePayloadSize", "maxMessagePayloadSize"])
def test_a_frame_over_a_limit_fails_the_socket_as_autobahn_does(factory, limit):
    data = client_frame(1, b'"small"') + client_frame(1, text(200)) + client_frame(1, b'"next"')
    sockets = [opened_socket(factory), opened_socket(factory)]
    for socket in sockets:
        setattr(socket, limit, 100)
    ours = fed(sockets[0], data, [], at_once=True)
    assert ours == fed(sockets[1], data, [], at_once=False)
    received = [event["text"] for event in ours[0] if event["type"] == "websocket.receive"]
    assert received == ['"small"'] and ours[2] != lean_server.STATE_OPEN


def test_whole_text_frames_are_read_without_autobahns_frame_by_frame_steps(factory):
    socket = opened_socket(factory)
    application_events(socket)  # websocket.connect
    socket.processData = None  # autobahn's reading of a frame, which must not run
    socket._dataReceived(client_frame(1, b'{"n": 1}') + client_frame(1, text(300)))
    events = application_events(socket)
    assert [event["text"] for event in events] == ['{"n": 1}', text(300).decode()]
    # Nor does the socket keep autobahn's per-message state for them.
    assert not {"message_data", "frame_data", "current_frame_masker"} & set(vars(socket))


def test_traffic_restarts_the_keep_alive_ping_as_with_autobahn(factory):
    socket = opened_socket(factory)
    application_events(socket)  # websocket.connect
    cancelled = []
    socket._cancelAutoPingTimeoutCall = lambda: cancelled.append(True)
    socket.autoPingTimeoutCall = object()  # a ping waits for its pong
    socket._dataReceived(client_frame(1, b"{}") + client_frame(1, b"[]"))
    assert cancelled == [True] and len(application_events(socket)) == 2
