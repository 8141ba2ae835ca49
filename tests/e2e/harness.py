"""Run a real hub for end-to-end tests and benchmarks: its own database, Redis, daphne and Celery.

`Hub` starts every process it needs on free ports of 127.0.0.1 and can kill, pause and restart
each of them, so a test can break one part and watch the rest recover. `AgentSocket` is an agent
as a real WebSocket client sees the hub.

    with Hub(servers=2) as hub:
        alice = hub.register("alice")
        async with await AgentSocket.connect(hub.ws_url(1), alice.access) as ws:
            ...
"""

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from mcp_project import serve

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import embedded_redis  # noqa: E402  (a script beside manage.py, not a package)

START_TIMEOUT = 30.0  # seconds for a server to answer /healthz after launch
DEFAULT_MAX_FRAME_BYTES = 512 * 1024  # settings.HUB["MAX_FRAME_BYTES"] without HUB_MAX_FRAME_BYTES
STOP_TIMEOUT = 5.0  # seconds for a graceful stop before SIGKILL
LOG_TAIL_LINES = 60

_hub_numbers = itertools.count(1)


class HubError(RuntimeError):
    """A hub process failed to start or a command failed; the message carries its log tail."""


def _tail(path: Path, lines: int = LOG_TAIL_LINES, width: int = 300) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # Tracebacks rendered with their local variables ("│ │ name = value") would crowd out
    # everything else; the frames and the exception line are kept.
    kept = [
        line[:width] for line in text.splitlines() if not line.startswith(("│ │", "│ ╭", "│ ╰"))
    ]
    return "\n".join(kept[-lines:])


# --- Database ---------------------------------------------------------------------------------


class Database:
    """A database of the hub's own: a SQLite file, or a fresh PostgreSQL database.

    PostgreSQL is used when DATABASE_URL is set in this process's environment; the hub then gets
    a database named after this process and hub number, created here and dropped at the end.
    """

    def __init__(self, workdir: Path, number: int):
        self.base_url = os.environ.get("DATABASE_URL", "")
        self.sqlite_path = workdir / "hub.sqlite3"
        self.name = f"hub_e2e_{os.getpid()}_{number}"

    @property
    def is_postgres(self) -> bool:
        return bool(self.base_url)

    def _url(self, dbname: str) -> str:
        parts = urlsplit(self.base_url)
        return urlunsplit(parts._replace(path="/" + dbname))

    def env(self) -> dict[str, str]:
        if self.is_postgres:
            return {"DATABASE_URL": self._url(self.name)}
        return {"SQLITE_PATH": str(self.sqlite_path)}

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self._url("postgres"), autocommit=True) as conn:
            conn.execute(statement)

    def create(self) -> None:
        if self.is_postgres:
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self._admin(f'CREATE DATABASE "{self.name}"')

    def drop(self, *, wait: bool = True) -> None:
        """Drop the PostgreSQL database; with wait=False in a thread that wait_for_drops() joins.

        DROP DATABASE waits for a checkpoint, seconds on a busy disk, which nothing else needs.
        """
        if not self.is_postgres:
            return
        if not wait:
            thread = threading.Thread(target=self.drop, name=f"drop {self.name}")
            thread.start()
            _pending_drops.append(thread)
            return
        # FORCE: a killed server's connections may linger until PostgreSQL notices.
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


_pending_drops: list[threading.Thread] = []


def wait_for_drops(timeout: float = 60) -> None:
    """Wait until every database dropped with wait=False is gone."""
    while _pending_drops:
        _pending_drops.pop().join(timeout)


# --- HTTP ---------------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    body: object
    headers: dict

    def json(self):
        return self.body


def http(method: str, url: str, *, body=None, token=None, headers=None, timeout=10.0) -> Response:
    """Make one HTTP request and return its status and JSON body (None when there is none)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an HTTP URL: {url}")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - checked above
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            status, raw, answer_headers = answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        status, raw, answer_headers = exc.code, exc.read(), dict(exc.headers)
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return Response(status, parsed, answer_headers)


# --- Processes ----------------------------------------------------------------------------------


@dataclass
class Managed:
    """One child process of the hub and the file its output goes to."""

    name: str
    log: Path
    proc: subprocess.Popen | None = None
    port: int | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self, args: list[str], env: dict[str, str], *, launcher: ThreadPoolExecutor) -> None:
        """Start the process from the hub's launcher thread (see Hub.__init__)."""
        launcher.submit(self._popen, args, env).result()

    def _popen(self, args: list[str], env: dict[str, str]) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n=== {' '.join(args)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # A group of its own, so kill() reaches children too (Celery's beat and pool).
                start_new_session=True,
                # Stopped if this process dies without a teardown (see die_with_parent).
                preexec_fn=embedded_redis.die_with_parent,
            )

    def signal(self, signum: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        """Stop at once with SIGKILL, as a crash or an OOM kill would."""
        if self.proc is None:
            return
        self._kill_group()
        self.proc.wait()

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM); a paused one is resumed first so that it can."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT, *, terminate: bool = True) -> None:
        """Stop gracefully within `timeout` seconds, else with SIGKILL."""
        if self.proc is None:
            return
        if terminate:
            self.terminate()
        if self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        # Children (Celery's beat) may outlive the leader; take the whole group down.
        self._kill_group()
        self.proc.wait()


@dataclass
class AgentCredentials:
    agent_id: str
    secret: str
    access: str
    refresh: str
    profile: dict = field(default_factory=dict)


class Hub:
    """A running hub: database, redis-server, `servers` daphne processes, optionally Celery.

    `env` adds to or overrides the servers' (and Celery's) environment, e.g.
    {"HUB_CHANNEL_CAPACITY": "10"}. Use as a context manager, or call start() and stop().
    """

    # Hubs started and not yet stopped, so a failing test's report can show their logs.
    running: set["Hub"] = set()

    def __init__(
        self, *, servers: int = 2, env: dict[str, str] | None = None, celery: bool = False
    ):
        self.number = next(_hub_numbers)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"hub-e2e-{self.number}-"))
        self.database = Database(self.workdir, self.number)
        self.extra_env = dict(env or {})
        self.want_celery = celery
        self.redis_port = embedded_redis.free_port()
        self.redis_proc: subprocess.Popen | None = None
        self.servers = [
            Managed(
                f"web{i + 1}", self.workdir / f"web{i + 1}.log", port=embedded_redis.free_port()
            )
            for i in range(servers)
        ]
        self.celery = Managed("celery", self.workdir / "celery.log")
        self._enrollment_key: str | None = None
        # Every child is started from this one long-lived thread: Linux delivers the children's
        # parent-death signal (die_with_parent) when the thread that forked them exits, so a
        # server restarted from a short-lived thread (asyncio.to_thread) would soon be stopped.
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hub{self.number}")

    # --- Lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "Hub":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> "Hub":
        Hub.running.add(self)
        try:
            self.start_redis()
            self.database.create()
            self.manage("migrate", "--noinput")
            for index in range(len(self.servers)):
                self._launch_server(index)
            for index in range(len(self.servers)):
                self._wait_healthy(index)
            if self.want_celery:
                self.start_celery()
        except BaseException:
            report = self.log_report()
            self.stop()
            if isinstance(report, str) and report:
                print(report, file=sys.stderr)
            raise
        return self

    def stop(self, *, wait_for_drop: bool = True) -> None:
        """Stop every process and drop the database; safe to call twice and after failures.

        With wait_for_drop=False the database is dropped in the background; call
        wait_for_drops() before the interpreter exits.
        """
        Hub.running.discard(self)
        processes = [*self.servers, self.celery]
        # SIGTERM to all first, so their graceful shutdowns overlap instead of adding up.
        for managed in processes:
            managed.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for managed in processes:
            with contextlib.suppress(Exception):
                managed.stop(max(0.0, deadline - time.monotonic()), terminate=False)
        with contextlib.suppress(Exception):
            self.stop_redis()
        with contextlib.suppress(Exception):
            self.database.drop(wait=wait_for_drop)
        self._launcher.shutdown(wait=False)
        if not os.environ.get("HUB_E2E_KEEP"):
            # A failing test's report already carries the log tails (see conftest.py).
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def env(self, **extra: str) -> dict[str, str]:
        """Return the environment every hub process runs with."""
        env = {
            key: value
            for key, value in os.environ.items()
            # The caller's own database and Redis must never leak into the hub's processes.
            if key not in {"DATABASE_URL", "SQLITE_PATH", "REDIS_URL", "CELERY_BROKER_URL"}
        }
        bin_dir = str(Path(sys.executable).parent)
        env.update(
            {
                "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                "DJANGO_SETTINGS_MODULE": "mcp_project.settings",
                "PYTHONUNBUFFERED": "1",
                "REDIS_URL": self.redis_url,
                "CELERY_BROKER_URL": self.redis_url,
                "HUB_VAR_DIR": str(self.workdir),
                **self.database.env(),
                **self.extra_env,
                **extra,
            }
        )
        return env

    def manage(self, *args: str, timeout: float = 120) -> str:
        """Run a manage.py command against this hub's database and Redis; return its stdout."""
        result = subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise HubError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    # --- Servers -------------------------------------------------------------------------------

    def url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.servers[index].port}"

    def ws_url(self, index: int = 0) -> str:
        return f"ws://127.0.0.1:{self.servers[index].port}/ws/agent/"

    def _launch_server(self, index: int) -> None:
        server = self.servers[index]
        env = self.env(HUB_SERVER_NAME=server.name)
        args = serve.command("-b", "127.0.0.1", "-p", str(server.port))
        # The transport limit equals the app's frame limit, as in the Procfile.
        max_frame = env.get("HUB_MAX_FRAME_BYTES", str(DEFAULT_MAX_FRAME_BYTES))
        args += ["--websocket-max-message-size", max_frame]
        server.launch(
            [*args, "mcp_project.asgi:application"],
            env,
            launcher=self._launcher,
        )

    def _wait_healthy(self, index: int, timeout: float = START_TIMEOUT) -> None:
        server = self.servers[index]
        deadline = time.monotonic() + timeout
        while True:
            if not server.running:
                raise HubError(f"{server.name} exited while starting:\n{_tail(server.log)}")
            with contextlib.suppress(OSError):
                if http("GET", self.url(index) + "/healthz", timeout=1).status == 200:
                    return
            if time.monotonic() > deadline:
                raise HubError(f"{server.name} did not answer /healthz in {timeout:.0f} s")
            time.sleep(0.05)

    def start_server(self, index: int) -> None:
        """Start a stopped or killed server again on its port and wait until it answers."""
        self._launch_server(index)
        self._wait_healthy(index)

    def kill_server(self, index: int) -> None:
        self.servers[index].kill()

    def restart_server(self, index: int) -> None:
        self.servers[index].stop()
        self.start_server(index)

    def pause_server(self, index: int) -> None:
        """Freeze a server (SIGSTOP): its sockets stay open but it reads nothing."""
        self.servers[index].signal(signal.SIGSTOP)

    def resume_server(self, index: int) -> None:
        self.servers[index].signal(signal.SIGCONT)

    # --- Redis ---------------------------------------------------------------------------------

    def start_redis(self) -> None:
        """Start this hub's redis-server on its port (empty: nothing is persisted)."""
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            return
        self.redis_proc = self._launcher.submit(
            embedded_redis.start_redis,
            port=self.redis_port,
            data_dir=self.workdir / "redis",
            log_file=self.workdir / "redis.log",
            persistent=False,
        ).result()

    def stop_redis(self) -> None:
        if self.redis_proc is not None:
            embedded_redis.stop_redis(self.redis_proc)

    def restart_redis(self) -> None:
        self.stop_redis()
        self.start_redis()

    def flush_redis(self) -> None:
        """Empty Redis while every connection to it stays up, as a failover to an empty replica
        would: channel-layer groups and queued nudges are gone, the processes never notice."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            client.flushall()
        finally:
            client.close()

    # --- Celery --------------------------------------------------------------------------------

    def start_celery(self) -> None:
        """Run one Celery worker with embedded beat, so the periodic sweeps really run."""
        args = [
            sys.executable, "-m", "celery", "-A", "mcp_project", "worker", "--beat",
            "--pool", "solo", "--loglevel", "INFO",
            "--schedule", str(self.workdir / "celerybeat-schedule"),
            "--hostname", f"e2e{self.number}@%h",
        ]  # fmt: skip
        self.celery.launch(args, self.env(), launcher=self._launcher)
        deadline = time.monotonic() + START_TIMEOUT
        while "ready." not in self.celery.log.read_text(errors="replace"):
            if not self.celery.running:
                raise HubError(f"celery exited while starting:\n{_tail(self.celery.log)}")
            if time.monotonic() > deadline:
                raise HubError(
                    f"celery was not ready in {START_TIMEOUT:.0f} s:\n{_tail(self.celery.log)}"
                )
            time.sleep(0.1)

    def stop_celery(self) -> None:
        self.celery.stop()

    # --- Agents over REST ------------------------------------------------------------------------

    def enrollment_key(self) -> str:
        if self._enrollment_key is None:
            output = self.manage("create_enrollment_key", "--uses", "1000", "--label", "e2e")
            lines = [line.strip() for line in output.splitlines() if line.strip()]
            self._enrollment_key = lines[-1]
        return self._enrollment_key

    def http(self, method: str, path: str, *, server: int = 0, **kwargs) -> Response:
        return http(method, self.url(server) + path, **kwargs)

    def register(
        self, agent_id: str | None = None, *, server: int = 0, **fields
    ) -> AgentCredentials:
        """Register an agent over REST with this hub's enrollment key; return its credentials."""
        agent_id = agent_id or f"agent-{uuid.uuid4().hex[:10]}"
        answer = self.http(
            "POST",
            "/api/v1/agents/",
            server=server,
            body={"agent_id": agent_id, "capabilities": [], **fields},
            headers={"X-Enrollment-Key": self.enrollment_key()},
        )
        if answer.status != 201:
            raise HubError(f"registering {agent_id} answered {answer.status}: {answer.body}")
        body = answer.body
        return AgentCredentials(
            agent_id=body["agent_id"],
            secret=body["agent_secret"],
            access=body["access"],
            refresh=body["refresh"],
            profile=body,
        )

    # --- Diagnostics --------------------------------------------------------------------------

    def log_report(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last lines of every process's log, for a failing test's report."""
        parts = []
        for managed in [*self.servers, self.celery]:
            if managed.log.exists():
                state = "running" if managed.running else "stopped"
                parts.append(
                    f"--- {managed.name} ({state}) {managed.log}\n{_tail(managed.log, lines)}"
                )
        redis_log = self.workdir / "redis.log"
        if redis_log.exists():
            parts.append(f"--- redis {redis_log}\n{_tail(redis_log, 15)}")
        return "\n".join(parts)


# --- WebSocket client ---------------------------------------------------------------------------


class SocketClosed(Exception):
    """The socket closed while a frame was awaited; `code` is the close code the server sent."""

    def __init__(self, code: int | None):
        super().__init__(f"socket closed with code {code}")
        self.code = code


class AgentSocket:
    """One agent's WebSocket, read by a background task.

    Frames answering a frame of ours (same `ref`) resolve that frame's call; `message` frames
    collect in `messages` in arrival order; every other frame (welcome, errors without ref,
    responses) goes to `events`.
    """

    _refs = itertools.count(1)

    def __init__(self, ws):
        self.ws = ws
        self.messages: list[dict] = []
        self.events: asyncio.Queue = asyncio.Queue()
        self.welcome: dict | None = None
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self._answers: dict[str, asyncio.Future] = {}
        self._new_message = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(
        cls, url: str, *, token: str | None = None, origin: str | None = None, timeout=10.0
    ):
        """Open a socket without waiting for the welcome (for authentication tests)."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        ws = await ws_connect(
            url,
            additional_headers=headers,
            origin=origin,
            open_timeout=timeout,
            # The hub's own heartbeat is the liveness signal; keepalive pings would only add
            # noise while a test pauses a server on purpose.
            ping_interval=None,
            close_timeout=2,
            max_size=2**24,
        )
        return cls(ws)

    @classmethod
    async def connect(cls, url: str, token: str, *, timeout: float = 10.0) -> "AgentSocket":
        """Open an authenticated socket and wait for its welcome frame."""
        sock = await cls.open(url, token=token, timeout=timeout)
        try:
            first = await sock.next_event(timeout=timeout)
        except BaseException:
            await sock.close()
            raise
        if first.get("type") != "welcome":
            await sock.close()
            raise HubError(f"expected a welcome frame, got {first}")
        sock.welcome = first
        return sock

    async def __aenter__(self) -> "AgentSocket":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _read(self):
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                ref = frame.get("ref")
                if frame.get("type") == "message":
                    self.messages.append(frame)
                    self._new_message.set()
                elif ref is not None and ref in self._answers:
                    future = self._answers.pop(ref)
                    if not future.done():
                        future.set_result(frame)
                else:
                    self.events.put_nowait(frame)
        except ConnectionClosed as exc:
            self.close_code = exc.rcvd.code if exc.rcvd is not None else None
        finally:
            if self.close_code is None:
                self.close_code = getattr(self.ws, "close_code", None)
            self.closed.set()
            self._new_message.set()
            for future in self._answers.values():
                if not future.done():
                    future.set_exception(SocketClosed(self.close_code))
                    future.exception()  # an answer nobody awaits must not be logged as lost
            self._answers.clear()

    # --- Sending -------------------------------------------------------------------------------

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def send_frame(self, frame: dict) -> asyncio.Future | None:
        """Send a frame; when it has a `ref`, return a future for the answer with that ref."""
        future = None
        ref = frame.get("ref")
        if ref is not None:
            future = asyncio.get_running_loop().create_future()
            self._answers[ref] = future
        if self.closed.is_set():
            raise SocketClosed(self.close_code)
        await self.ws.send(json.dumps(frame))
        return future

    async def call(self, frame: dict, *, timeout: float = 10.0) -> dict:
        """Send a frame with a fresh ref and return the server's answer to it."""
        frame = {**frame, "ref": frame.get("ref") or f"r{next(self._refs)}"}
        future = await self.send_frame(frame)
        return await asyncio.wait_for(future, timeout)

    async def send_to(self, to: str, payload, *, client_id: str | None = None, **extra) -> dict:
        frame = {"type": "send", "to": to, "payload": payload, **extra}
        if client_id is not None:
            frame["id"] = client_id
        return await self.call(frame)

    async def ack(self, message_ids) -> dict:
        return await self.call({"type": "ack", "message_ids": [str(m) for m in message_ids]})

    # --- Receiving -----------------------------------------------------------------------------

    async def next_event(self, *, timeout: float = 10.0) -> dict:
        """Return the next frame that is neither a message nor an answer to one of our refs."""
        getter = asyncio.ensure_future(self.events.get())
        closer = asyncio.ensure_future(self.closed.wait())
        try:
            done, _ = await asyncio.wait(
                {getter, closer}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closer.cancel()
        if getter in done:
            return getter.result()
        getter.cancel()
        if self.closed.is_set() and self.events.empty():
            raise SocketClosed(self.close_code)
        if not self.events.empty():
            return self.events.get_nowait()
        raise TimeoutError(f"no frame within {timeout} s")

    async def wait_messages(
        self, count: int, *, timeout: float = 10.0, predicate=None
    ) -> list[dict]:
        """Wait until `count` message frames (matching `predicate`, if given) have arrived."""
        deadline = asyncio.get_running_loop().time() + timeout

        def matching():
            return [m for m in self.messages if predicate is None or predicate(m)]

        while len(matching()) < count:
            if self.closed.is_set():
                raise SocketClosed(self.close_code)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"{len(matching())} of {count} messages within {timeout} s")
            self._new_message.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_message.wait(), remaining)
        return matching()

    async def wait_closed(self, *, timeout: float = 10.0) -> int | None:
        """Wait until the server closes the socket and return the close code."""
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 3)
        if not self._reader.done():
            self._reader.cancel()


# --- Workloads under faults ---------------------------------------------------------------------


class Receiver:
    """An agent that stays connected to one server, reconnecting whenever its socket ends.

    Every message frame it gets is kept in `frames` (duplicates and redeliveries included), and
    acknowledged by id in small batches, as a well-behaved agent would.
    """

    def __init__(
        self,
        hub: Hub,
        credentials: AgentCredentials,
        server: int,
        *,
        ack_every: float = 0.05,
        read_delay: float = 0.0,
    ):
        self.hub = hub
        self.read_delay = read_delay  # seconds spent on each frame: a slow reader
        self.credentials = credentials
        self.server = server
        self.ack_every = ack_every
        self.frames: list[dict] = []
        self.welcomes: list[dict] = []
        self.close_codes: list[int | None] = []
        self.connect_failures = 0
        self._stopping = asyncio.Event()
        self._seen: set[str] = set()
        self._task: asyncio.Task | None = None

    @property
    def agent_id(self) -> str:
        return self.credentials.agent_id

    def received_ids(self) -> set[str]:
        return set(self._seen)

    def start(self) -> "Receiver":
        self._task = asyncio.ensure_future(self._run())
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)

    async def wait_for(self, message_ids: set[str], *, timeout: float) -> None:
        """Wait until every id in message_ids has arrived (TimeoutError names how many did not)."""
        deadline = time.monotonic() + timeout
        while not message_ids <= self._seen:
            if time.monotonic() > deadline:
                missing = len(message_ids - self._seen)
                raise TimeoutError(
                    f"{self.agent_id}: {missing} of {len(message_ids)} messages missing"
                )
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stopping.is_set():
            try:
                sock = await AgentSocket.connect(
                    self.hub.ws_url(self.server), self.credentials.access, timeout=5
                )
            except (OSError, TimeoutError, SocketClosed, HubError, ConnectionClosed) as exc:
                self.connect_failures += 1
                if isinstance(exc, SocketClosed):
                    self.close_codes.append(exc.code)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
                continue
            backoff = 0.05
            self.welcomes.append(sock.welcome)
            try:
                await self._consume(sock)
            finally:
                await sock.close()
                self.close_codes.append(sock.close_code)

    async def _consume(self, sock: AgentSocket) -> None:
        read = 0
        unacked: list[str] = []
        last_ack = time.monotonic()
        while True:
            if self._stopping.is_set():
                if unacked:
                    # Waits for the answer, so the hub has recorded the acks when stop() returns.
                    with contextlib.suppress(SocketClosed, ConnectionClosed, TimeoutError):
                        await sock.ack(unacked)
                return
            try:
                await sock.wait_messages(read + 1, timeout=self.ack_every)
            except TimeoutError:
                pass
            except SocketClosed:
                pass
            new = sock.messages[read:]
            read += len(new)
            for frame in new:
                if self.read_delay:
                    await asyncio.sleep(self.read_delay)
                self.frames.append(frame)
                self._seen.add(frame["message_id"])
                unacked.append(frame["message_id"])
            if sock.closed.is_set():
                return
            if unacked and (time.monotonic() - last_ack >= self.ack_every or len(unacked) >= 200):
                batch, unacked = unacked[:1000], unacked[1000:]
                try:
                    await sock.send_frame({"type": "ack", "message_ids": batch})
                except (SocketClosed, ConnectionClosed):
                    return  # not acknowledged: the hub sends them again, which is allowed
                last_ack = time.monotonic()


@dataclass
class Planned:
    """One message a Sender must get accepted: to whom, with which counter and client id."""

    to: str
    counter: int
    client_id: str


class Sender:
    """An agent that gets a planned list of messages accepted, in order, whatever breaks.

    Up to `window` frames are in flight. When the socket ends, it reconnects and sends again
    from the first message without an `accepted` answer, with the same client ids, so a message
    stored before the break is answered as a duplicate instead of stored twice.
    """

    def __init__(
        self,
        hub: Hub,
        credentials: AgentCredentials,
        server: int,
        plan: list[Planned],
        *,
        window: int = 20,
        pace: float = 0.0,
    ):
        self.hub = hub
        self.credentials = credentials
        self.server = server
        self.plan = plan
        self.window = window
        self.pace = pace
        self.accepted: dict[str, dict] = {}  # client id -> accepted frame
        self.errors: list[dict] = []
        self.sessions = 0
        self.first_sent_at: float | None = None
        self.done_at: float | None = None

    @property
    def agent_id(self) -> str:
        return self.credentials.agent_id

    async def run(self) -> None:
        backoff = 0.05
        while len(self.accepted) < len(self.plan):
            try:
                sock = await AgentSocket.connect(
                    self.hub.ws_url(self.server), self.credentials.access, timeout=5
                )
            except (OSError, TimeoutError, SocketClosed, HubError, ConnectionClosed):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
                continue
            backoff = 0.05
            self.sessions += 1
            try:
                await self._send_all(sock)
            except (SocketClosed, ConnectionClosed, TimeoutError):
                pass
            finally:
                await sock.close()
        self.done_at = time.monotonic()

    async def _send_all(self, sock: AgentSocket) -> None:
        start = next(i for i, p in enumerate(self.plan) if p.client_id not in self.accepted)
        in_flight: list[tuple[Planned, asyncio.Future]] = []
        for planned in self.plan[start:]:
            if self.first_sent_at is None:
                self.first_sent_at = time.monotonic()
            frame = {
                "type": "send",
                "to": planned.to,
                "id": planned.client_id,
                "payload": {"from": self.agent_id, "n": planned.counter},
                "ref": planned.client_id,
            }
            in_flight.append((planned, await sock.send_frame(frame)))
            if len(in_flight) >= self.window:
                await self._settle(in_flight.pop(0))
            if self.pace:
                await asyncio.sleep(self.pace)
        for item in in_flight:
            await self._settle(item)

    async def _settle(self, item) -> None:
        planned, future = item
        answer = await asyncio.wait_for(future, 30)
        if answer.get("type") == "accepted":
            self.accepted[planned.client_id] = answer
            return
        # Anything else (unavailable, rate_limited): note it and start over from this message.
        self.errors.append(answer)
        await asyncio.sleep(float(answer.get("retry_after") or 0.2))
        raise SocketClosed(None)


def plan_round_robin(
    senders: list[str], receivers: list[str], total: int
) -> dict[str, list[Planned]]:
    """Split `total` messages over the senders, each cycling over the receivers.

    Counters run per (sender, receiver) pair, so each pair's order can be checked on arrival.
    """
    plans: dict[str, list[Planned]] = {s: [] for s in senders}
    counters: dict[tuple[str, str], int] = {}
    for i in range(total):
        sender = senders[i % len(senders)]
        to = receivers[(i // len(senders)) % len(receivers)]
        n = counters.get((sender, to), 0)
        counters[(sender, to)] = n + 1
        plans[sender].append(Planned(to=to, counter=n, client_id=f"{sender}:{to}:{n}"))
    return plans


@dataclass
class Accounting:
    """What happened to every accepted message, as the agents saw it."""

    accepted: int
    received: int  # distinct message ids that reached their recipient
    lost: list[str]  # accepted, never received
    unexpected: list[str]  # received, never accepted (or by the wrong recipient)
    duplicate_frames: int  # frames repeating a message id (at-least-once redeliveries)
    stored_twice: list[tuple]  # one planned message stored under two message ids
    seq_disorder: list[str]  # recipients whose first-seen seq did not strictly increase
    pair_disorder: list[tuple]  # (sender, recipient) pairs whose counters came out of order
    redelivered_frames: int

    def summary(self) -> str:
        return (
            f"accepted={self.accepted} received={self.received} lost={len(self.lost)} "
            f"unexpected={len(self.unexpected)} duplicate_frames={self.duplicate_frames} "
            f"redelivered_frames={self.redelivered_frames} stored_twice={len(self.stored_twice)} "
            f"seq_disorder={self.seq_disorder} pair_disorder={self.pair_disorder[:5]}"
        )


def account(senders: list[Sender], receivers: list[Receiver]) -> Accounting:
    """Check every accepted message against what the receivers got."""
    expected: dict[str, tuple[str, str, int]] = {}  # message id -> (sender, recipient, counter)
    for sender in senders:
        by_client_id = {p.client_id: p for p in sender.plan}
        for client_id, answer in sender.accepted.items():
            planned = by_client_id[client_id]
            expected[answer["message_id"]] = (sender.agent_id, planned.to, planned.counter)

    lost, unexpected, stored_twice, seq_disorder, pair_disorder = [], [], [], [], []
    duplicate_frames = redelivered = received = 0
    for receiver in receivers:
        first_seen: list[dict] = []
        ids: set[str] = set()
        for frame in receiver.frames:
            redelivered += bool(frame.get("redelivered"))
            if frame["message_id"] in ids:
                duplicate_frames += 1
                continue
            ids.add(frame["message_id"])
            first_seen.append(frame)
        received += len(ids)
        mine = {mid for mid, (_, to, _) in expected.items() if to == receiver.agent_id}
        lost.extend(sorted(mine - ids))
        unexpected.extend(sorted(ids - mine))

        seqs = [frame["seq"] for frame in first_seen]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            seq_disorder.append(receiver.agent_id)
        last: dict[str, int] = {}
        counted: dict[tuple[str, int], str] = {}
        for frame in first_seen:
            sender, n = frame["payload"]["from"], frame["payload"]["n"]
            if (sender, n) in counted:
                stored_twice.append((sender, receiver.agent_id, n))
            counted[(sender, n)] = frame["message_id"]
            if n <= last.get(sender, -1):
                pair_disorder.append((sender, receiver.agent_id, last[sender], n))
            last[sender] = max(n, last.get(sender, -1))
    return Accounting(
        accepted=len(expected),
        received=received,
        lost=lost,
        unexpected=unexpected,
        duplicate_frames=duplicate_frames,
        stored_twice=stored_twice,
        seq_disorder=seq_disorder,
        pair_disorder=pair_disorder,
        redelivered_frames=redelivered,
    )
