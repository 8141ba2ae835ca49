"""Load-client processes and the barrier that keeps them in step with the orchestrator.

Each worker runs one coroutine `fn(config, control)` in its own event loop. Workers and the
orchestrator meet at barriers (`control.sync()` / `Workers.sync()`); the orchestrator publishes the
monotonic start time of the measured run between the first two. CLOCK_MONOTONIC is system-wide on
Linux, so a timestamp taken in one process is comparable in another.
"""

import asyncio
import multiprocessing
import queue
import signal
import threading
import time
import traceback

from . import procstat

RESULT_GRACE = 120.0  # seconds past the expected end before a silent worker is a failure


class WorkerFailed(RuntimeError):
    pass


class Control:
    """A worker's side of the barriers."""

    def __init__(self, index: int, barrier, start_at):
        self.index = index
        self._barrier = barrier
        self._start_at = start_at

    async def sync(self, timeout: float = 600.0) -> None:
        await asyncio.to_thread(self._barrier.wait, timeout)

    @property
    def start_at(self) -> float:
        return self._start_at.value


def _worker_main(fn, index, config, barrier, start_at, results) -> None:
    # The orchestrator stops workers itself; a terminal Ctrl-C should not print a traceback here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    procstat.raise_nofile_limit()
    try:
        result = asyncio.run(fn(config, Control(index, barrier, start_at)))
    except BaseException:
        results.put(("error", index, traceback.format_exc()))
        barrier.abort()  # release the orchestrator and the other workers at once
        return
    results.put(("ok", index, result))


class Workers:
    """Run `fn` in one process per config; use as a context manager so they always end."""

    def __init__(self, fn, configs: list[dict]):
        context = multiprocessing.get_context("fork")
        self._barrier = context.Barrier(len(configs) + 1)
        self._start_at = context.Value("d", 0.0)
        self._results = context.Queue()
        self._errors: list[str] = []
        self._processes = [
            context.Process(
                target=_worker_main,
                args=(fn, index, config, self._barrier, self._start_at, self._results),
                daemon=True,
            )
            for index, config in enumerate(configs)
        ]

    def __enter__(self):
        for process in self._processes:
            process.start()
        return self

    def __exit__(self, *exc_info):
        self._barrier.abort()
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()

    def _drain_errors(self) -> str:
        while True:
            try:
                status, index, payload = self._results.get_nowait()
            except queue.Empty:
                break
            if status == "error":
                self._errors.append(f"worker {index}:\n{payload}")
        return "\n".join(self._errors) or "a worker stopped without a report"

    def sync(self, timeout: float = 600.0) -> None:
        try:
            self._barrier.wait(timeout)
        except threading.BrokenBarrierError:
            time.sleep(0.2)  # let a failing worker's report reach the queue
            raise WorkerFailed(self._drain_errors()) from None

    def start(self, delay: float = 0.3) -> float:
        """Publish the start time (now + delay) and release the workers; return it."""
        start = time.monotonic() + delay
        self._start_at.value = start
        self.sync()
        return start

    def results(self, timeout: float) -> list:
        deadline = time.monotonic() + timeout + RESULT_GRACE
        found: dict[int, object] = {}
        while len(found) < len(self._processes):
            try:
                status, index, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise WorkerFailed("workers did not report in time") from None
                if not any(p.is_alive() for p in self._processes) and self._results.empty():
                    raise WorkerFailed(self._drain_errors()) from None
                continue
            if status == "error":
                raise WorkerFailed(f"worker {index}:\n{payload}")
            found[index] = payload
        return [found[index] for index in sorted(found)]


def split(items: list, parts: int) -> list[list]:
    """Split items into `parts` nearly equal contiguous slices (fewer if there are few items)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        out.append(items[start:end])
        start = end
    return out
