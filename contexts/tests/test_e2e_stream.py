"""The context change stream across two real server processes sharing one Redis.

Two daphne processes serve one SQLite database; an agent watches on one process while another
agent writes through the other, so every frame it gets has crossed the Redis channel layer.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect

from mcp_project import serve

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
FRAME_TIMEOUT = 5.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Answer:
    status: int
    body: object
    headers: dict


def http(method, url, *, body=None, token=None, headers=None) -> Answer:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (local URL)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 (local URL)
            status, raw, answer_headers = answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        status, raw, answer_headers = exc.code, exc.read(), dict(exc.headers)
    return Answer(status, json.loads(raw) if raw else None, answer_headers)


class TwoServers:
    """Two daphne processes on one migrated SQLite file and the test's Redis."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "SQLITE_TEST_PATH")
        }
        self.env.update(
            SQLITE_PATH=str(workdir / "hub.sqlite3"),
            REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            # Frames must cross processes, so the Redis layer, with a prefix of its own.
            HUB_CHANNEL_LAYER="redis",
            HUB_CHANNEL_PREFIX=f"e2e-{uuid.uuid4().hex[:10]}",
            HUB_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def start(self) -> None:
        self.manage("migrate", "--noinput")
        for number in (1, 2):
            port = free_port()
            log = open(self.workdir / f"daphne-{number}.log", "wb")  # noqa: SIM115 (kept open)
            proc = subprocess.Popen(
                serve.command("-b", "127.0.0.1", "-p", str(port), "mcp_project.asgi:application"),
                cwd=ROOT,
                env={**self.env, "HUB_SERVER_NAME": f"e2e-server-{number}"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            self.ports.append(port)
            self.procs.append(proc)
        for number, port in enumerate(self.ports, start=1):
            self._wait_ready(number, port)

    def _wait_ready(self, number: int, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.procs[number - 1].poll() is not None:
                break
            try:
                if http("GET", f"http://127.0.0.1:{port}/healthz").status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        log = (self.workdir / f"daphne-{number}.log").read_text(errors="replace")
        raise AssertionError(f"server {number} did not start:\n{log[-3000:]}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def api(self, number: int) -> str:
        return f"http://127.0.0.1:{self.ports[number - 1]}/api/v1/"

    def ws(self, number: int) -> str:
        return f"ws://127.0.0.1:{self.ports[number - 1]}/ws/agent/"

    def register(self, agent_id: str, key: str) -> str:
        answer = http(
            "POST",
            self.api(1) + "agents/",
            body={"agent_id": agent_id, "capabilities": []},
            headers={"X-Enrollment-Key": key},
        )
        assert answer.status == 201, answer.body
        return answer.body["access"]


@pytest.fixture
def servers(tmp_path):
    hub = TwoServers(tmp_path)
    try:
        hub.start()
        yield hub
    finally:
        hub.stop()


async def call(*args, **kwargs) -> Answer:
    return await asyncio.to_thread(http, *args, **kwargs)


class Socket:
    def __init__(self, connection):
        self.connection = connection

    @classmethod
    async def open(cls, url: str, token: str) -> "Socket":
        connection = await ws_connect(url, additional_headers={"Authorization": f"Bearer {token}"})
        socket_ = cls(connection)
        assert (await socket_.receive())["type"] == "welcome"
        return socket_

    async def receive(self) -> dict:
        return json.loads(await asyncio.wait_for(self.connection.recv(), FRAME_TIMEOUT))

    async def watch(self, **filters) -> str:
        await self.connection.send(json.dumps({"type": "watch", "ref": "w", **filters}))
        answer = await self.receive()
        assert answer["type"] == "watching", answer
        return answer["watch_id"]

    async def context(self) -> dict:
        frame = await self.receive()
        assert frame["type"] == "context", frame
        return frame


async def test_changes_written_on_one_server_reach_watchers_on_the_other(servers):
    key = servers.manage("create_enrollment_key", "--uses", "5").strip().splitlines()[-1]
    alice = await asyncio.to_thread(servers.register, "alice", key)
    bob = await asyncio.to_thread(servers.register, "bob", key)
    alice_ws = await Socket.open(servers.ws(1), alice)
    bob_ws = await Socket.open(servers.ws(2), bob)
    try:
        await alice_ws.watch(agent_id="bob")
        await bob_ws.watch(context_type="task_result")

        # bob writes on server 2; alice watches on server 1.
        created = await call(
            "POST",
            servers.api(2) + "contexts/",
            token=bob,
            body={"context_type": "state_update", "key": "status", "payload": {"step": 1}},
        )
        assert created.status == 201, created.body
        entry = created.body
        frame = await alice_ws.context()
        assert (frame["event"], frame["version"]) == ("created", 1)
        assert frame["entry"] == entry

        url = servers.api(2) + f"contexts/{entry['context_id']}/"
        updated = await call(
            "PATCH", url, token=bob, body={"payload": {"step": 2}}, headers={"If-Match": '"1"'}
        )
        assert updated.status == 200, updated.body
        frame = await alice_ws.context()
        assert (frame["event"], frame["version"]) == ("updated", 2)
        assert frame["entry"]["payload"] == {"step": 2}

        # And the other way: alice writes on server 1, bob watches on server 2.
        mine = await call(
            "POST",
            servers.api(1) + "contexts/",
            token=alice,
            body={"context_type": "task_result", "payload": {"rows": 3}},
        )
        frame = await bob_ws.context()
        assert frame["entry"]["context_id"] == mine.body["context_id"]

        assert (await call("DELETE", url, token=bob)).status == 204
        frame = await alice_ws.context()
        assert (frame["event"], frame["entry"]["context_id"]) == ("deleted", entry["context_id"])

        # Expiry: gone for readers at once, announced by the purge (a third process).
        short = await call(
            "POST",
            servers.api(2) + "contexts/",
            token=bob,
            body={"context_type": "metadata", "payload": {}, "ttl_seconds": 1},
        )
        assert (await alice_ws.context())["event"] == "created"
        await asyncio.sleep(1.2)
        read = await call(
            "GET", servers.api(1) + f"contexts/{short.body['context_id']}/", token=alice
        )
        assert read.status == 404
        await asyncio.to_thread(
            servers.manage,
            "shell",
            "-c",
            "from contexts.tasks import purge_expired_contexts; purge_expired_contexts()",
        )
        frame = await alice_ws.context()
        assert (frame["event"], frame["entry"]["context_id"]) == (
            "expired",
            short.body["context_id"],
        )
    finally:
        await alice_ws.connection.close()
        await bob_ws.connection.close()
