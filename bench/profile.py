"""Sample the server under load with py-spy and summarize where its time goes.

py-spy sees every thread (daphne's event loop and the thread that runs the ORM), which cProfile
and pyinstrument, bound to one thread, do not. The raw output is collapsed stacks, one
`thread;frame;frame;... count` per line, which speedscope and flamegraph.pl also read.
"""

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r" \(([^()]*):\d+\)$")  # " (file.py:123)" at the end of a frame


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy attached to a running process from start() to stop()."""

    def __init__(
        self, pid: int, out: Path, *, rate: int = 100, idle: bool = False, gil: bool = False
    ):
        executable = py_spy()
        if executable is None:
            raise RuntimeError("--profile needs py-spy: pip install 'py-spy>=0.4,<0.5'")
        self.out = out
        self._args = [
            executable, "record", "--pid", str(pid), "--rate", str(rate),
            "--format", "raw", "--threads", "--output", str(out),
        ]  # fmt: skip
        if idle:
            # Wall-clock view: waits on the database, Redis and other threads count too.
            self._args.append("--idle")
        if gil:
            # Only the thread holding the interpreter lock: where a GIL-bound server's time goes.
            self._args.append("--gil")
        self._proc = None

    def start(self) -> None:
        self._proc = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self, timeout: float = 30.0) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        try:
            _, stderr = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, stderr = self._proc.communicate()
        if self._proc.returncode != 0 or not self.out.exists():
            raise RuntimeError(f"py-spy failed: {stderr.decode(errors='replace')[-500:]}")

    def kill(self) -> None:
        """Stop at once without waiting for output (cleanup after an error)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _function(frame: str) -> str:
    """Drop the line number and the install prefix from a py-spy frame name.

    'Consumer.receive (/venv/lib/python3.11/site-packages/channels/consumer.py:62)' becomes
    'Consumer.receive (channels/consumer.py)'.
    """
    match = _LINE.search(frame)
    if not match:
        return frame
    path = match.group(1)
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.rsplit("/main/", 1)[-1]
    return f"{frame[: match.start()]} ({path})"


def _package(function: str) -> str:
    """'Query.setup_joins (django/db/models/sql/query.py)' -> 'django'; stdlib: 'asyncio'."""
    path = function.rsplit(" (", 1)[-1].rstrip(")")
    return path.split("/", 1)[0].removesuffix(".py")


# Frames every stack passes through (threads, event loop, daphne, sync/async bridges): their
# inclusive time is just the thread's, so they are left out of the inclusive ranking.
_PLUMBING = (
    "(threading.py)", "(concurrent/futures/", "(<frozen runpy>)", "(daphne/__main__.py)",
    "(daphne/cli.py)", "(daphne/server.py)", "(twisted/internet/asyncioreactor.py)",
    "(asyncio/base_events.py)", "(asyncio/events.py)", "(asgiref/sync.py)", "(channels/db.py)",
    "(django/utils/asyncio.py)",
)  # fmt: skip


# Leaf frames where a thread sleeps rather than computes. py-spy's own idle filter (off unless
# --profile wall) does not catch all of them, so they are counted apart.
_WAITING = {
    "Condition.wait (threading.py)",
    "EpollSelector.select (selectors.py)",
    "_worker (concurrent/futures/thread.py)",
    "Thread._wait_for_tstate_lock (threading.py)",
    "Event.wait (threading.py)",
}
_POOL_THREAD = re.compile(r"-\d+_\d+$")  # ThreadPoolExecutor-302_0: one pool per request


def summarize(raw: Path, top: int = 10) -> dict:
    """Summarize collapsed stacks: time spent waiting, top functions by own and inclusive time,
    and time per thread, each as a percentage of all samples.
    """
    own: Counter = Counter()
    inclusive: Counter = Counter()
    threads: Counter = Counter()
    packages: Counter = Counter()
    total = waiting = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            thread = frames.pop(0).split(": ", 1)[-1]
            threads[_POOL_THREAD.sub("", thread)] += samples
        functions = [_function(frame) for frame in frames]
        if not functions:
            continue
        total += samples
        if functions[-1] in _WAITING:
            waiting += samples
            continue
        own[functions[-1]] += samples
        packages[_package(functions[-1])] += samples
        for name in set(functions):
            if not any(part in name for part in _PLUMBING):
                inclusive[name] += samples

    def share(counter: Counter, n: int) -> list:
        return [
            {"function": name, "percent": round(100 * samples / total, 1)}
            for name, samples in counter.most_common(n)
        ]

    return {
        "samples": total,
        "file": str(raw),
        "waiting_percent": round(100 * waiting / total, 1) if total else None,
        "by_own_time": share(own, top) if total else [],
        "by_package": share(packages, top) if total else [],
        "by_inclusive_time": share(inclusive, top * 2) if total else [],
        "by_thread": share(threads, 10) if total else [],
    }
