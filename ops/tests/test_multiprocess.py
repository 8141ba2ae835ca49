"""The documented multi-process topology, started as the README starts it, passes messages.

`honcho -f Procfile.multi start` runs Redis, two daphne servers, a Celery worker and Celery beat;
the database is this machine's PostgreSQL when DATABASE_URL is set, else SQLite. Agents on
different servers talk to each other, and the worker and beat really sweep: an unacknowledged
message comes back marked redelivered.
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from django.db import connection

from agents import services as agent_services
from tests.e2e.harness import AgentSocket, embedded_redis, http

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = 200
START_TIMEOUT = 60.0

pytestmark = [
    pytest.mark.e2e,
    # Five processes start on a machine that may be busy: more room than the default 120 s.
    pytest.mark.timeout(240),
    pytest.mark.skipif(embedded_redis.find_redis_server() is None, reason="no redis-server"),
]


class Topology:
    """Procfile.multi under honcho, on free ports, on the test database."""

    def __init__(self, database_env: dict[str, str]):
        self.workdir = Path(tempfile.mkdtemp(prefix="hub-multi-"))
        self.database_env = database_env
        self.ports = {name: embedded_redis.free_port() for name in ("web1", "web2", "redis")}
        self.log = self.workdir / "honcho.log"
        self.proc = None

    def env(self) -> dict[str, str]:
        bin_dirs = [
            str(Path(sys.executable).parent),
            str(Path(embedded_redis.find_redis_server()).parent),
        ]
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"DATABASE_URL", "SQLITE_PATH", "REDIS_URL", "CELERY_BROKER_URL"}
        }
        redis_url = f"redis://127.0.0.1:{self.ports['redis']}/0"
        env.update(
            {
                "PATH": os.pathsep.join([*bin_dirs, env.get("PATH", "")]),
                "PYTHONUNBUFFERED": "1",
                "HUB_VAR_DIR": str(self.workdir),
                "REDIS_URL": redis_url,
                "HUB_CACHE_URL": redis_url.removesuffix("/0") + "/1",
                "HUB_WEB1_PORT": str(self.ports["web1"]),
                "HUB_WEB2_PORT": str(self.ports["web2"]),
                "HUB_REDIS_PORT": str(self.ports["redis"]),
                # Sweeps every second, redelivery after two: the test sees them within seconds.
                "HUB_SWEEP_INTERVAL": "1",
                "HUB_REDELIVERY_DELAY": "2",
                "HUB_LOG_FORMAT": "json",
                "HUB_LOG_LEVEL": "WARNING",
                **self.database_env,
            }
        )
        return env

    def url(self, server: str) -> str:
        return f"http://127.0.0.1:{self.ports[server]}"

    def ws_url(self, server: str) -> str:
        return f"ws://127.0.0.1:{self.ports[server]}/ws/agent/"

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "honcho", "-f", "Procfile.multi", "start"],
                cwd=ROOT, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=embedded_redis.die_with_parent,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        for server in ("web1", "web2"):
            while True:
                assert self.proc.poll() is None, self.log.read_text()
                with contextlib.suppress(OSError):
                    if http("GET", self.url(server) + "/readyz", timeout=2).status == 200:
                        break
                assert time.monotonic() < deadline, f"{server} not ready:\n{self.log.read_text()}"
                time.sleep(0.1)

    def stop(self) -> int | None:
        code = None
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)  # honcho stops every process it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return code

    def register(self, agent_id: str, key: str) -> str:
        answer = http(
            "POST", self.url("web1") + "/api/v1/agents/",
            body={"agent_id": agent_id, "capabilities": []}, headers={"X-Enrollment-Key": key},
        )  # fmt: skip
        assert answer.status == 201, answer.body
        return answer.body["access"]


def database_env() -> dict[str, str]:
    """Point the processes at this test's database (migrated, and flushed afterwards)."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return {"SQLITE_PATH": str(db["NAME"])}
    password = f":{db['PASSWORD']}" if db["PASSWORD"] else ""
    address = f"{db['HOST']}:{db['PORT'] or 5432}"
    return {"DATABASE_URL": f"postgres://{db['USER']}{password}@{address}/{db['NAME']}"}


@pytest.fixture
def topology(transactional_db):
    # The processes read what this test commits, so the test database must not hold it in a
    # transaction; pytest-django empties it afterwards, once the processes are gone.
    running = Topology(database_env())
    _, running.enrollment_key = agent_services.enrollment_key_create(label="multi", max_uses=10)
    try:
        running.start()
        yield running
    finally:
        running.stop()


async def first_copies(sock: AgentSocket, count: int, *, timeout: float) -> list[dict]:
    """Wait for `count` distinct messages; return the first copy of each, in arrival order.

    Redeliveries of unacknowledged messages may arrive in between (at least once).
    """
    deadline = time.monotonic() + timeout
    while True:
        seen, first = set(), []
        for frame in sock.messages:
            if frame["message_id"] not in seen:
                seen.add(frame["message_id"])
                first.append(frame)
        if len(first) >= count:
            return first
        assert time.monotonic() < deadline, f"{len(first)} of {count} messages"
        await asyncio.sleep(0.05)


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_two_servers_worker_and_beat_pass_messages_across_processes(topology):
    key = topology.enrollment_key
    tokens = {name: topology.register(name, key) for name in ("alice", "bob", "carol", "dave")}

    # alice and carol on web1, bob and dave on web2.
    alice = await AgentSocket.connect(topology.ws_url("web1"), tokens["alice"])
    carol = await AgentSocket.connect(topology.ws_url("web1"), tokens["carol"])
    bob = await AgentSocket.connect(topology.ws_url("web2"), tokens["bob"])
    dave = await AgentSocket.connect(topology.ws_url("web2"), tokens["dave"])

    # Direct messages web1 -> web2, as fast as alice can get them accepted.
    started = time.monotonic()
    pending = [
        await alice.send_frame({"type": "send", "to": "bob", "payload": {"n": n}, "ref": f"m{n}"})
        for n in range(MESSAGES)
    ]
    accepted = [await asyncio.wait_for(answer, 30) for answer in pending]
    accepted_after = time.monotonic() - started
    frames = await first_copies(bob, MESSAGES, timeout=60)
    delivered_after = time.monotonic() - started
    assert all(answer["type"] == "accepted" for answer in accepted)
    assert [frame["payload"]["n"] for frame in frames] == list(range(MESSAGES))
    assert [frame["seq"] for frame in frames] == list(range(1, MESSAGES + 1))
    await bob.ack([frame["message_id"] for frame in frames])

    # A topic publish from web2 reaches a subscriber on web1; a broadcast reaches everyone.
    assert (await carol.call({"type": "subscribe", "topic": "alerts"}))["type"] == "subscribed"
    assert (await dave.call({"type": "publish", "topic": "alerts", "payload": "p"}))[
        "recipients"
    ] == 1
    [published] = await carol.wait_messages(1)
    assert published["from"] == "dave" and published["topic"] == "alerts"
    assert (await dave.call({"type": "broadcast", "payload": "b"}))["recipients"] == 3
    for sock in (alice, bob, carol):
        await sock.wait_messages(1, predicate=lambda m: m["kind"] == "broadcast")

    # Request/reply across servers: carol (web1) asks bob (web2).
    asked = await carol.send_frame({"type": "request", "to": "bob", "payload": "q?", "ref": "q"})
    [question] = await bob.wait_messages(1, predicate=lambda m: m["kind"] == "request")
    await bob.send_frame({"type": "reply", "in_reply_to": question["message_id"], "payload": "a!"})
    assert (await asyncio.wait_for(asked, 10))["type"] == "accepted"
    answer = await carol.next_event(timeout=10)
    assert answer["type"] == "response" and answer["payload"] == "a!"

    # dave never acknowledges: beat schedules the sweep, the worker runs it, dave gets it again.
    unacked = await alice.send_to("dave", "ack me")
    swept_from = time.monotonic()
    copies = await dave.wait_messages(
        2, timeout=30, predicate=lambda m: m["message_id"] == unacked["message_id"]
    )
    redelivered_after = time.monotonic() - swept_from
    assert [copy["redelivered"] for copy in copies[:2]] == [False, True]

    # Each server counts what it did, labelled with its name; both see the sweeps' records.
    web1 = http("GET", topology.url("web1") + "/metrics").body
    web2 = http("GET", topology.url("web2") + "/metrics").body
    # alice's messages to bob, and the one dave never acknowledges.
    assert metric(web1, 'hub_messages_accepted_total{kind="direct",server="web1"}') == MESSAGES + 1
    assert metric(web2, 'hub_messages_delivered_total{server="web2"}') >= MESSAGES
    assert metric(web2, 'hub_sessions_open{server="web1"}') == 2
    assert metric(web1, 'hub_sweep_runs_total{task="messaging.tasks.redeliver_due"}') >= 1
    status = json.loads(topology.manage("hub_status", "--json"))
    assert status["status"] == "ok"
    assert status["details"]["sessions_by_server"] == {"web1": 2, "web2": 2}
    sweeps = {sweep["task"]: sweep for sweep in status["details"]["sweeps"]}
    assert sweeps["agents.tasks.sweep_liveness"]["status"] == "ok"

    for sock in (alice, bob, carol, dave):
        await sock.close()
    histogram_sum = metric(web2, 'hub_delivery_latency_seconds_sum{server="web2"}')
    histogram_count = metric(web2, 'hub_delivery_latency_seconds_count{server="web2"}')
    print(
        f"\nmulti-process: {MESSAGES} direct messages web1->web2 accepted in "
        f"{accepted_after:.2f} s ({MESSAGES / accepted_after:.0f}/s), all delivered in order "
        f"after {delivered_after:.2f} s; mean delivery latency "
        f"{histogram_sum / histogram_count * 1000:.1f} ms over {histogram_count:.0f} deliveries; "
        f"unacknowledged message redelivered by beat+worker after {redelivered_after:.1f} s"
    )
