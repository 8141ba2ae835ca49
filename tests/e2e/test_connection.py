"""Authentication, bad frames and deregistration as a real client sees them over the network."""

import asyncio
import base64
import json
import os
import signal
import time
from urllib.parse import urlsplit

import pytest

from .conftest import E2E_ORIGIN
from .harness import AgentSocket

pytestmark = pytest.mark.e2e


async def test_it_closes_with_4401_on_a_bad_bearer_token(hub):
    sock = await AgentSocket.open(hub.ws_url(0), token="not-a-jwt")
    error = await sock.next_event()
    assert error["type"] == "error" and error["code"] == "not_authenticated"
    assert await sock.wait_closed() == 4401
    assert sock.welcome is None


async def test_it_closes_with_4401_on_a_bad_token_in_the_auth_frame(hub):
    sock = await AgentSocket.open(hub.ws_url(1), origin=E2E_ORIGIN)
    error = await sock.call({"type": "auth", "token": "still-not-a-jwt"})
    assert error["type"] == "error" and error["code"] == "not_authenticated"
    assert await sock.wait_closed() == 4401


def write_opening_handshake(writer, address, path: str, header: str) -> None:
    """Write a WebSocket opening handshake for `path` by hand, with one more header line."""
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {address.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{header}\r\n\r\n".encode()
    )


async def test_it_refuses_a_socket_to_a_path_without_a_route(hub):
    address = urlsplit(hub.ws_url(0))
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    write_opening_handshake(writer, address, "/ws/nowhere/", f"Origin: {E2E_ORIGIN}")
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 500"), head


async def test_it_closes_with_4408_when_no_credentials_arrive_in_time(hub):
    # The hub runs with HUB_AUTH_TIMEOUT=1 (see conftest.BASE_ENV).
    started = time.monotonic()
    sock = await AgentSocket.open(hub.ws_url(0), origin=E2E_ORIGIN)
    assert await sock.wait_closed(timeout=10) == 4408
    assert 0.9 <= time.monotonic() - started < 5


async def test_it_accepts_a_first_frame_auth_from_an_allowed_origin(hub):
    agent = hub.register()
    sock = await AgentSocket.open(hub.ws_url(1), origin=E2E_ORIGIN)
    async with sock:
        await sock.send_frame({"type": "auth", "token": agent.access})
        welcome = await sock.next_event()
        assert welcome["type"] == "welcome" and welcome["agent_id"] == agent.agent_id


async def test_it_answers_bad_frames_with_errors_and_keeps_the_connection_usable(hub):
    alice, bob = hub.register(), hub.register()
    async with (
        await AgentSocket.connect(hub.ws_url(0), alice.access) as a,
        await AgentSocket.connect(hub.ws_url(1), bob.access) as b,
    ):
        await a.send_raw("{not json")
        assert (await a.next_event())["code"] == "invalid_json"

        await a.send_raw(json.dumps(["a", "list"]))
        assert (await a.next_event())["type"] == "error"

        unknown = await a.call({"type": "teleport"})
        assert unknown["type"] == "error" and unknown["code"] == "unknown_type"

        missing = await a.call({"type": "send", "payload": {}})
        assert missing["code"] == "invalid_frame" and "to" in missing["detail"]

        nobody = await a.call({"type": "send", "to": "nobody-here", "payload": {}})
        assert nobody["code"] == "unknown_recipient"

        too_big = await a.call({"type": "send", "to": bob.agent_id, "payload": "x" * 300_000})
        assert too_big["code"] == "payload_too_large"

        ack_garbage = await a.call({"type": "ack", "message_ids": ["not-a-uuid"]})
        assert ack_garbage["type"] == "error"

        # Still connected and working, both ways.
        assert (await a.call({"type": "heartbeat"}))["type"] == "heartbeat_ack"
        accepted = await a.send_to(bob.agent_id, {"after": "errors"})
        assert accepted["type"] == "accepted"
        [message] = await b.wait_messages(1)
        assert message["payload"] == {"after": "errors"}
        assert not a.closed.is_set()


async def test_deregistering_over_rest_on_one_server_closes_the_socket_on_the_other_with_4403(hub):
    agent = hub.register()
    sock = await AgentSocket.connect(hub.ws_url(1), agent.access)
    started = time.monotonic()
    answer = await asyncio.to_thread(
        hub.http, "DELETE", "/api/v1/agents/me/", server=0, token=agent.access
    )
    assert answer.status == 204

    assert await sock.wait_closed(timeout=5) == 4403
    assert time.monotonic() - started < 5

    again = await asyncio.to_thread(
        hub.http, "GET", "/api/v1/agents/me/", server=1, token=agent.access
    )
    assert again.status == 401
    rejected = await AgentSocket.open(hub.ws_url(0), token=agent.access)
    assert await rejected.wait_closed() in (4401, 4403)


async def test_a_server_shutting_down_closes_its_sockets_with_1012_at_once(hub):
    agent = hub.register()
    sock = await AgentSocket.connect(hub.ws_url(1), agent.access)
    try:
        hub.servers[1].signal(signal.SIGTERM)
        # At once, not at the end of the shutdown grace period (10 s): agents move elsewhere.
        assert await sock.wait_closed(timeout=5) == 1012
        async with await AgentSocket.connect(hub.ws_url(0), agent.access) as elsewhere:
            assert elsewhere.welcome["agent_id"] == agent.agent_id
    finally:
        await asyncio.to_thread(hub.restart_server, 1)


class RawSocket:
    """A WebSocket client that writes frames byte by byte: what a library would refuse to send."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str, token: str) -> "RawSocket":
        address = urlsplit(url)
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        write_opening_handshake(writer, address, address.path, f"Authorization: Bearer {token}")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        head = bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)])
        self.writer.write(head + mask + masked)

    async def next_frame(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload); (None, b"") once the TCP is closed
        or dropped."""
        try:
            first, second = await asyncio.wait_for(self.reader.readexactly(2), 10)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None, b""
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        return first & 0x0F, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def test_text_frames_are_checked_for_utf8_and_a_message_split_inside_a_character_arrives(hub):
    agent = hub.register()
    sock = await RawSocket.open(hub.ws_url(0), agent.access)
    try:
        opcode, welcome = await sock.next_frame()
        assert opcode == 1 and json.loads(welcome)["type"] == "welcome"
        text = json.dumps({"type": "heartbeat", "ref": "café ✓"}, ensure_ascii=False).encode()
        cut = text.index("é".encode()) + 1  # inside the two bytes of é
        sock.send(0x1, text[:cut], fin=False)
        sock.send(0x0, text[cut:])
        opcode, answer = await sock.next_frame()
        assert opcode == 1 and json.loads(answer) == {
            "type": "heartbeat_ack",
            "ref": "café ✓",
            "server_time": json.loads(answer)["server_time"],
        }
        sock.send(0x1, b'{"type": "heartbeat", "ref": "\xff"}')
        opcode, payload = await sock.next_frame()
        if opcode == 0x8:  # a close frame, if the server sends one before dropping the TCP
            assert int.from_bytes(payload[:2], "big") == 1007
            opcode, payload = await sock.next_frame()
        assert opcode is None
        # Refused like any bad frame: the server logs no error of its own.
        await asyncio.sleep(0.2)
        assert "UnicodeDecodeError" not in hub.servers[0].log.read_text(errors="replace")
    finally:
        sock.close()
