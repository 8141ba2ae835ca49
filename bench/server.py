"""Start what a benchmark measures, and stop all of it afterwards whatever happens.

The hub: a fresh SQLite (WAL) file or a fresh PostgreSQL database, migrated; its own redis-server
on a free port; agents registered in bulk; ONE daphne process. The reference: one
`python -m bench.reference_hub` process. Both yield a `Server` the workloads drive.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from mcp_project import serve

from . import procstat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import embedded_redis  # noqa: E402  (stdlib only, beside the other scripts)

HOST = "127.0.0.1"
START_TIMEOUT = 60.0  # seconds for a server to answer after start
STOP_TIMEOUT = 10.0  # seconds for a graceful stop before SIGKILL
DEFAULT_PG_URL = "postgres://postgres@127.0.0.1:5432"


@dataclass
class Server:
    """A running server under measurement."""

    kind: str  # "hub" or "reference"
    pid: int
    ws_url: str
    http_port: int
    agents: list[dict]  # in spec order; hub agents carry an "access" token
    workdir: Path
    log_path: Path
    helper_pids: Callable[[], dict[str, list[int]]] = field(default=lambda: {})
    db: str = ""

    def target(self) -> dict:
        """Describe the server to a load-client process (picklable)."""
        return {"kind": self.kind, "ws_url": self.ws_url, "http": (HOST, self.http_port)}

    def memory(self) -> dict:
        return procstat.memory_mb(self.pid)


class Cleanup:
    """Callbacks run in reverse order on exit, each even if an earlier one failed."""

    def __init__(self):
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        while self._callbacks:
            callback = self._callbacks.pop()
            try:
                callback()
            except Exception as exc:  # keep stopping the rest
                print(f"bench: cleanup failed: {exc!r}", file=sys.stderr)


def start_process(args: list[str], *, env: dict, log_path: Path) -> subprocess.Popen:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: Ctrl-C reaches only the bench, which then stops everything in order.
            start_new_session=True,
            preexec_fn=embedded_redis.die_with_parent,
        )


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait(ready: Callable[[], bool], proc: subprocess.Popen, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {START_TIMEOUT:.0f} s")
        time.sleep(0.1)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own server
            return response.status == 200
    except OSError:
        return False


def _run(args: list[str], *, env: dict, log_path: Path) -> None:
    with log_path.open("ab") as log:
        done = subprocess.run(
            args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{_log_tail(log_path)}")


def _workdir(cleanup: Cleanup, prefix: str, keep: bool) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    if not keep:
        cleanup.add(lambda: shutil.rmtree(workdir, ignore_errors=True))
    return workdir


# --- The reference hub ----------------------------------------------------------------------------


@contextlib.contextmanager
def reference_server(*, agents: list[dict], keep: bool = False) -> Iterator[Server]:
    with Cleanup() as cleanup:
        workdir = _workdir(cleanup, "hub-bench-ref-", keep)
        spec = workdir / "agents.json"
        spec.write_bytes(orjson.dumps(agents))
        port, http_port = embedded_redis.free_port(), embedded_redis.free_port()
        log_path = workdir / "reference.log"
        args = [sys.executable, "-m", "bench.reference_hub", "--port", str(port)]
        args += ["--http-port", str(http_port), "--agents-file", str(spec)]
        proc = start_process(args, env={**os.environ, "PYTHONUNBUFFERED": "1"}, log_path=log_path)
        cleanup.add(lambda: stop_process(proc))
        _wait(lambda: _port_open(port) and _port_open(http_port), proc, "reference hub", log_path)
        yield Server(
            kind="reference",
            pid=proc.pid,
            ws_url=f"ws://{HOST}:{port}/",
            http_port=http_port,
            agents=agents,
            workdir=workdir,
            log_path=log_path,
        )


# --- The hub --------------------------------------------------------------------------------------


def _pg_admin(base_url: str):
    import psycopg

    return psycopg.connect(
        f"{base_url.replace('postgres://', 'postgresql://', 1)}/postgres", autocommit=True
    )


def _pg_create(base_url: str, name: str) -> None:
    from psycopg import sql

    with _pg_admin(base_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def _pg_drop(base_url: str, name: str) -> None:
    from psycopg import sql

    with _pg_admin(base_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _pg_backends(base_url: str, name: str) -> list[int]:
    try:
        with _pg_admin(base_url) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchall()
    except Exception:
        return []
    return [pid for (pid,) in rows]


@contextlib.contextmanager
def hub_server(
    *,
    agents: list[dict],
    db: str = "sqlite",
    pg_url: str = DEFAULT_PG_URL,
    extra_env: dict | None = None,
    keep: bool = False,
) -> Iterator[Server]:
    """Start redis-server, a fresh migrated database with `agents` registered, and one daphne."""
    with Cleanup() as cleanup:
        workdir = _workdir(cleanup, "hub-bench-", keep)
        log_path = workdir / "hub.log"
        redis_port = embedded_redis.free_port()
        redis = embedded_redis.start_redis(
            port=redis_port, data_dir=workdir / "redis", log_file=workdir / "redis.log"
        )
        cleanup.add(lambda: embedded_redis.stop_redis(redis))

        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "SQLITE_PATH")
        }
        env.update(
            DJANGO_SETTINGS_MODULE="mcp_project.settings",
            # Production-like: with DEBUG on, Django keeps every SQL statement in memory.
            DJANGO_DEBUG="0",
            HUB_LOG_LEVEL="WARNING",
            HUB_VAR_DIR=str(workdir),
            HUB_SERVER_NAME="bench",
            REDIS_URL=f"redis://{HOST}:{redis_port}/0",
            # Tokens outlive any run, so no socket is closed for expiry mid-measurement.
            JWT_ACCESS_LIFETIME="86400",
            PYTHONUNBUFFERED="1",
        )
        db_name = ""
        if db == "postgres":
            db_name = f"bench_{os.getpid()}_{int(time.time())}"
            _pg_create(pg_url, db_name)
            cleanup.add(lambda: _pg_drop(pg_url, db_name))
            env["DATABASE_URL"] = f"{pg_url}/{db_name}"
        elif db == "sqlite":
            env["SQLITE_PATH"] = str(workdir / "hub.sqlite3")
        else:
            raise ValueError(f"db must be 'sqlite' or 'postgres', not {db!r}")
        env.update(extra_env or {})

        _run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
            env=env,
            log_path=log_path,
        )
        spec, tokens = workdir / "agents.json", workdir / "tokens.json"
        spec.write_bytes(orjson.dumps(agents))
        _run(
            [sys.executable, "-m", "bench.provision", "--spec", str(spec), "--out", str(tokens)],
            env=env,
            log_path=log_path,
        )

        port = embedded_redis.free_port()
        args = serve.command("-b", HOST, "-p", str(port), "mcp_project.asgi:application")
        proc = start_process(args, env=env, log_path=log_path)
        cleanup.add(lambda: stop_process(proc))
        _wait(lambda: _http_ok(f"http://{HOST}:{port}/healthz"), proc, "daphne", log_path)

        def helper_pids() -> dict[str, list[int]]:
            pids = {"redis": [redis.pid]}
            if db == "postgres":
                pids["postgres"] = _pg_backends(pg_url, db_name)
            return pids

        yield Server(
            kind="hub",
            pid=proc.pid,
            ws_url=f"ws://{HOST}:{port}/ws/agent/",
            http_port=port,
            agents=orjson.loads(tokens.read_bytes()),
            workdir=workdir,
            log_path=log_path,
            helper_pids=helper_pids,
            db=db,
        )
