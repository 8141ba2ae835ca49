"""The reference hub: what one Python process can do with plain `websockets` and nothing else.

Direct messages are routed by agent id, broadcasts and topics live in memory, nothing is stored and
nobody is authenticated. It speaks the hub's frame shapes (welcome, send, broadcast, publish,
subscribe, heartbeat, ack in; welcome, accepted, message, subscribed, heartbeat_ack, error out) so
the same load client drives both servers; acks are read and ignored. A tiny HTTP/1.1 server answers
discovery (`GET /api/v1/agents/?capability=`) from an in-memory index, for the REST workload.

    python -m bench.reference_hub --port 8765 [--http-port 8766] [--agents-file agents.json]

An agent names itself in the URL (`ws://host:port/?agent_id=a1`) or in a first frame
`{"type": "hello", "agent_id": "a1"}`.
"""

import argparse
import asyncio
import contextlib
import itertools
import signal
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

HEARTBEAT_INTERVAL = 30
MAX_FRAME_BYTES = 512 * 1024
DISCOVERY_DEFAULT_LIMIT = 50
DISCOVERY_MAX_LIMIT = 500


def _now() -> datetime:
    return datetime.now(UTC)


def _error(code: str, detail: str, ref=None) -> bytes:
    frame = {"type": "error", "code": code, "detail": detail}
    if ref is not None:
        frame["ref"] = ref
    return orjson.dumps(frame)


class ReferenceHub:
    def __init__(self, profiles: list[dict] | None = None):
        self.sockets: dict[str, ServerConnection] = {}
        self.topics: dict[str, set[str]] = defaultdict(set)
        self.seqs: dict[str, int] = defaultdict(int)
        self.sessions = itertools.count(1)
        self.profiles: dict[str, dict] = {}
        self.by_capability: dict[str, list[str]] = defaultdict(list)
        created = _now().isoformat()
        for spec in sorted(profiles or (), key=lambda item: item["agent_id"]):
            agent_id = spec["agent_id"]
            self.profiles[agent_id] = {
                "agent_id": agent_id,
                "name": spec.get("name", ""),
                "description": spec.get("description", ""),
                "capabilities": [
                    {"name": name, "version": "", "description": ""}
                    for name in sorted(spec.get("capabilities", ()))
                ],
                "metadata": spec.get("metadata", {}),
                "state": "active",
                "last_seen_at": None,
                "created_at": created,
                "updated_at": created,
            }
            for name in spec.get("capabilities", ()):
                self.by_capability[name].append(agent_id)

    # --- WebSocket ----------------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        agent_id = parse_qs(urlsplit(ws.request.path).query).get("agent_id", [None])[0]
        try:
            if agent_id is None:
                agent_id = await self._hello(ws)
                if agent_id is None:
                    return
            self.sockets[agent_id] = ws
            welcome = {
                "type": "welcome",
                "agent_id": agent_id,
                "session_id": str(next(self.sessions)),
                "heartbeat_interval": HEARTBEAT_INTERVAL,
                "pending": 0,
                "server_time": _now(),
            }
            await ws.send(orjson.dumps(welcome), text=True)
            subscribed: set[str] = set()
            while True:
                raw = await ws.recv(decode=False)
                await self.dispatch(ws, agent_id, raw, subscribed)
        except ConnectionClosed:
            pass
        finally:
            if agent_id is not None and self.sockets.get(agent_id) is ws:
                del self.sockets[agent_id]
                for topic in self.topics.values():
                    topic.discard(agent_id)

    async def _hello(self, ws: ServerConnection) -> str | None:
        try:
            frame = orjson.loads(await ws.recv(decode=False))
            agent_id = frame.get("agent_id") if isinstance(frame, dict) else None
        except orjson.JSONDecodeError:
            agent_id = None
        if not isinstance(agent_id, str) or not agent_id:
            await ws.send(_error("invalid_frame", "agent_id: is required"), text=True)
            await ws.close(4401)
            return None
        return agent_id

    async def dispatch(
        self, ws: ServerConnection, agent_id: str, raw: bytes, subscribed: set
    ) -> None:
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await ws.send(_error("invalid_json", "frame is not valid JSON"), text=True)
            return
        if not isinstance(frame, dict):
            await ws.send(_error("invalid_frame", "frame must be an object"), text=True)
            return
        kind = frame.get("type")
        ref = frame.get("ref")
        if kind == "send":
            peer = self.sockets.get(frame.get("to"))
            if peer is None:
                await ws.send(
                    _error("unknown_recipient", "recipient is not connected", ref), text=True
                )
                return
            await self._accept(
                ws, agent_id, ref, "direct", frame.get("payload"), [(frame["to"], peer)]
            )
        elif kind == "broadcast":
            peers = [(other, peer) for other, peer in self.sockets.items() if other != agent_id]
            await self._accept(ws, agent_id, ref, "broadcast", frame.get("payload"), peers)
        elif kind == "publish":
            topic = frame.get("topic")
            names = self.topics.get(topic, ())
            peers = [(name, self.sockets[name]) for name in names if name in self.sockets]
            await self._accept(ws, agent_id, ref, "topic", frame.get("payload"), peers, topic=topic)
        elif kind in ("subscribe", "unsubscribe"):
            topic = frame.get("topic")
            if not isinstance(topic, str) or not topic:
                await ws.send(_error("invalid_frame", "topic: is required", ref), text=True)
                return
            if kind == "subscribe":
                self.topics[topic].add(agent_id)
                subscribed.add(topic)
            else:
                self.topics[topic].discard(agent_id)
                subscribed.discard(topic)
            await ws.send(orjson.dumps({"type": kind + "d", "ref": ref, "topic": topic}), text=True)
        elif kind == "heartbeat":
            ack = {"type": "heartbeat_ack", "ref": ref, "server_time": _now()}
            await ws.send(orjson.dumps(ack), text=True)
        elif kind == "ack":
            pass  # nothing is kept, so there is nothing to settle
        else:
            await ws.send(_error("unknown_type", f"unknown frame type {kind!r}", ref), text=True)

    async def _accept(self, ws, sender, ref, kind, payload, peers, topic=None) -> None:
        message_id = str(uuid.uuid4())
        now = _now()
        for name, peer in peers:
            self.seqs[name] += 1
            frame = {
                "type": "message",
                "message_id": message_id,
                "seq": self.seqs[name],
                "kind": kind,
                "from": sender,
                "payload": payload,
                "sent_at": now,
                "redelivered": False,
            }
            if topic is not None:
                frame["topic"] = topic
            with contextlib.suppress(ConnectionClosed):  # no persistence: a closed peer loses it
                await peer.send(orjson.dumps(frame), text=True)
        accepted = {
            "type": "accepted",
            "ref": ref,
            "message_id": message_id,
            "status": "delivered",
            "recipients": len(peers),
            "duplicate": False,
        }
        await ws.send(orjson.dumps(accepted), text=True)

    # --- HTTP discovery -----------------------------------------------------------------------

    async def handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                status, body = self.http_route(method, target)
                reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
                head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            pass
        finally:
            writer.close()

    def http_route(self, method: str, target: str) -> tuple[int, bytes]:
        parts = urlsplit(target)
        if method == "GET" and parts.path == "/healthz":
            return 200, b'{"status": "ok"}'
        if method != "GET" or parts.path != "/api/v1/agents/":
            return 404, b'{"detail": "Not found."}'
        query = parse_qs(parts.query)
        try:
            limit = min(int(query.get("limit", [DISCOVERY_DEFAULT_LIMIT])[0]), DISCOVERY_MAX_LIMIT)
            offset = int(query.get("offset", [0])[0])
        except ValueError:
            return 400, b'{"detail": "limit and offset must be integers."}'
        names = query.get("capability", [])
        if names:
            lists = sorted((self.by_capability.get(name, []) for name in names), key=len)
            others = [set(ids) for ids in lists[1:]]
            ids = [agent_id for agent_id in lists[0] if all(agent_id in s for s in others)]
        else:
            ids = list(self.profiles)
        results = [
            {
                **self.profiles[agent_id],
                "status": "online" if agent_id in self.sockets else "offline",
            }
            for agent_id in ids[offset : offset + limit]
        ]
        body = {"count": len(ids), "next": None, "previous": None, "results": results}
        return 200, orjson.dumps(body)


async def serve_forever(
    *, host: str, port: int, http_port: int | None, profiles: list[dict]
) -> None:
    hub = ReferenceHub(profiles)
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.cancel)
    http = None
    if http_port is not None:
        http = await asyncio.start_server(hub.handle_http, host, http_port, backlog=4096)
    # Compression off, as daphne has it: the payloads are small and deflate would cost CPU.
    async with serve(
        hub.handle, host, port, compression=None, max_size=MAX_FRAME_BYTES, backlog=4096
    ):
        with contextlib.suppress(asyncio.CancelledError):
            await stop
    if http is not None:
        http.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reference_hub", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="WebSocket port")
    parser.add_argument(
        "--http-port", type=int, help="port of the discovery endpoint (none if unset)"
    )
    parser.add_argument("--agents-file", type=Path, help="JSON list of {agent_id, capabilities}")
    args = parser.parse_args(argv)
    profiles = orjson.loads(args.agents_file.read_bytes()) if args.agents_file else []
    asyncio.run(
        serve_forever(host=args.host, port=args.port, http_port=args.http_port, profiles=profiles)
    )


if __name__ == "__main__":
    main()
