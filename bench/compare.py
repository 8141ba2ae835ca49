"""Print a Markdown table of two baselines side by side: `python -m bench.compare BEFORE AFTER`.

Each row is one figure of one workload and database: the reference's and the hub's value before
and after, and the hub/reference ratio before and after. Rows of figures that got worse by more
than the tolerance (default 10%) are marked, so a regression cannot slip by unnoticed.
"""

import argparse
import sys
from pathlib import Path

import orjson

from .report import RATIOS, RESULTS_DIR, _get

# Figures where a smaller value is better; for every other figure larger is better.
SMALLER_IS_BETTER = ("latency", "rss", "cpu", "peak")
# The headline figures of each workload (the rest are in the JSON).
HEADLINES = {
    "direct": ["delivered_per_s", "latency_ms.p99", "cpu_us_per_message.server_with_helpers"],
    "latency": ["delivered_per_s", "latency_ms.p50", "latency_ms.p99"],
    "fanout": [
        "broadcast.delivered_per_s",
        "broadcast.latency_ms.p99",
        "topic.delivered_per_s",
        "topic.latency_ms.p99",
    ],
    "idle": ["rss_per_connection_kb", "connect_per_s", "heartbeat_latency_ms.p99"],
    "rest": ["requests_per_s", "latency_ms.p99"],
}


def _smaller_is_better(figure: str) -> bool:
    return any(word in figure for word in SMALLER_IS_BETTER)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.3g}" if isinstance(value, float) else f"{value:,}"


def _ratio(hub, reference):
    if hub is None or not reference:
        return None
    return hub / reference


def rows(before: dict, after: dict, tolerance: float) -> list[list[str]]:
    table = []
    for run in sorted(set(before.get("runs", {})) | set(after.get("runs", {}))):
        workload, db = run.split("-", 1)
        old, new = before.get("runs", {}).get(run, {}), after.get("runs", {}).get(run, {})
        for figure in HEADLINES.get(workload, RATIOS.get(workload, [])):
            hub_old, hub_new = _get(old.get("hub"), figure), _get(new.get("hub"), figure)
            ref_old = _get(old.get("reference"), figure)
            ref_new = _get(new.get("reference"), figure)
            mark = ""
            if hub_old and hub_new is not None:
                change = hub_new / hub_old
                worse = (
                    change > 1 + tolerance
                    if _smaller_is_better(figure)
                    else (change < 1 - tolerance)
                )
                mark = " ⚠" if worse else ""
            table.append(
                [
                    workload,
                    db,
                    figure,
                    _fmt(ref_old),
                    _fmt(hub_old),
                    _fmt(ref_new),
                    _fmt(hub_new) + mark,
                    _fmt(_ratio(hub_old, ref_old)),
                    _fmt(_ratio(hub_new, ref_new)),
                ]
            )
    return table


def markdown(table: list[list[str]]) -> str:
    header = [
        "workload",
        "db",
        "figure",
        "reference before",
        "hub before",
        "reference after",
        "hub after",
        "ratio before",
        "ratio after",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, nargs="?", default=RESULTS_DIR / "before.json")
    parser.add_argument("after", type=Path, nargs="?", default=RESULTS_DIR / "baseline.json")
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args(argv)
    before = orjson.loads(args.before.read_bytes())
    after = orjson.loads(args.after.read_bytes())
    print(markdown(rows(before, after, args.tolerance)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
