"""CPU time and memory of processes, read from /proc (Linux), and the file descriptor limit."""

import os
import resource

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """Return user + system CPU seconds of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # The command name in parentheses may contain spaces; fields after it are fixed.
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15)


def memory_mb(pid: int) -> dict:
    """Return {"rss_mb": resident now, "peak_rss_mb": high-water mark} of a process."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    values[name] = int(rest.split()[0]) / 1024  # kB to MiB
    except OSError:
        pass
    return {"rss_mb": values.get("VmRSS"), "peak_rss_mb": values.get("VmHWM")}


def machine_busy_seconds() -> float:
    """Return CPU seconds all cores have spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(value) for value in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def other_busy_cores(seconds: float = 2.0) -> float:
    """Return how many cores the machine kept busy over the next `seconds`."""
    import time

    busy, began = machine_busy_seconds(), time.monotonic()
    time.sleep(seconds)
    return (machine_busy_seconds() - busy) / (time.monotonic() - began)


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class CpuMeter:
    """CPU seconds a set of processes spent between begin() and end().

    `pids` is called at both ends, so processes that appear in between (a PostgreSQL backend for
    a new connection) count from zero.
    """

    def __init__(self, pids):
        self._pids = pids
        self._begin: dict[int, float] = {}
        self._end: dict[int, float] = {}

    def _sample(self) -> dict[int, float]:
        sample = {}
        for pid in self._pids():
            value = cpu_seconds(pid)
            if value is not None:
                sample[pid] = value
        return sample

    def begin(self) -> None:
        self._begin = self._sample()

    def end(self) -> None:
        self._end = self._sample()

    def seconds(self) -> float:
        return sum(value - self._begin.get(pid, 0.0) for pid, value in self._end.items())
