"""Turn both sides' figures into one comparison: ratios (hub / reference), targets, files."""

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson

from .stats import ratio

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINE = RESULTS_DIR / "baseline.json"


def _get(figures: dict | None, path: str):
    value = figures
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


# For each workload: the figures compared (hub / reference), and the targets of the issue as
# (name, figure, comparison, bound).
RATIOS = {
    "direct": [
        "delivered_per_s", "latency_ms.p50", "latency_ms.p99",
        "server.cpu_util", "server.peak_rss_mb", "cpu_us_per_message.server_with_helpers",
    ],
    "latency": [
        "latency_ms.p50", "latency_ms.p99", "latency_ms.max",
        "server.cpu_util", "server.peak_rss_mb",
    ],
    "fanout": [
        "broadcast.delivered_per_s", "broadcast.latency_ms.p99",
        "broadcast.cpu_us_per_message.server_with_helpers",
        "topic.delivered_per_s", "topic.latency_ms.p99",
        "topic.cpu_us_per_message.server_with_helpers",
    ],
    "idle": [
        "rss_per_connection_kb", "connect_per_s", "heartbeat_latency_ms.p99", "server.cpu_util",
        "server.peak_rss_mb",
    ],
    "rest": ["requests_per_s", "latency_ms.p50", "latency_ms.p99", "server.cpu_util"],
}  # fmt: skip
TARGETS = {
    "direct": [("throughput at least half the reference's", "delivered_per_s", ">=", 0.5)],
    "latency": [("p99 at 1,000/s at most 3x the reference's", "latency_ms.p99", "<=", 3.0)],
    "idle": [("memory per connection at most the reference's", "rss_per_connection_kb", "<=", 1.0)],
}


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import websockets

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "websockets": websockets.__version__,
        "loadavg": list(os.getloadavg()),
    }


def code() -> dict:
    """Return the commit measured and whether the working tree had changes on top of it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted_changes": bool(status),
    }


def compare(workload: str, db: str, params: dict, sides: dict) -> dict:
    reference, hub = sides.get("reference"), sides.get("hub")
    ratios = {key: ratio(_get(hub, key), _get(reference, key)) for key in RATIOS[workload]}
    targets = []
    for name, key, op, bound in TARGETS.get(workload, []):
        value = ratios.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        targets.append(
            {"target": name, "ratio": key, "value": value, "bound": f"{op} {bound}", "met": met}
        )
    return {
        "workload": workload,
        "db": db,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": machine(),
        "code": code(),
        "params": params,
        "reference": reference,
        "hub": hub,
        "ratio": ratios,
        "targets": targets,
    }


def write(result: dict, results_dir: Path, stamp: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result['workload']}-{result['db']}-{stamp}.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return path


def _without_samples(result: dict) -> dict:
    """Drop profile details that only make sense next to their raw file."""
    slim = orjson.loads(orjson.dumps(result))
    for side in ("reference", "hub"):
        figures = slim.get(side) or {}
        for holder in [figures, *[v for v in figures.values() if isinstance(v, dict)]]:
            if isinstance(holder, dict) and "profile" in holder:
                holder["profile"] = {k: v for k, v in holder["profile"].items() if k != "file"}
    return slim


def update_baseline(result: dict, path: Path = BASELINE) -> None:
    """Store this result in the committed baseline under '<workload>-<db>'."""
    baseline = orjson.loads(path.read_bytes()) if path.exists() else {}
    baseline.setdefault(
        "about", "First figures of `python -m bench`; later runs compare against these."
    )
    baseline.setdefault("runs", {})[f"{result['workload']}-{result['db']}"] = _without_samples(
        result
    )
    path.write_bytes(orjson.dumps(baseline, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
