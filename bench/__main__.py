"""python -m bench <direct|latency|fanout|idle|rest|all> [options]; see README, Benchmarks."""

import argparse
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson

from . import procstat, report
from .workloads import WORKLOADS

# Issue sizes, per workload; --quick swaps in the second set so everything runs in seconds.
# Explicit flags always win.
DEFAULTS = {
    "direct": {"duration": 30.0, "pairs": 50},
    "latency": {"duration": 30.0, "pairs": 50},
    "fanout": {"duration": 20.0, "agents": 1000},
    "idle": {"duration": 60.0, "agents": 10000, "heartbeat_interval": 30},
    "rest": {"duration": 20.0, "agents": 10000},
}
QUICK = {
    "direct": {"duration": 3.0, "pairs": 10},
    "latency": {"duration": 3.0, "pairs": 10},
    "fanout": {"duration": 3.0, "agents": 100},
    "idle": {"duration": 5.0, "agents": 500, "heartbeat_interval": 2},
    "rest": {"duration": 3.0, "agents": 1000},
}


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return name, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure the hub against a minimal reference hub under the same load.",
    )
    p.add_argument("workload", nargs="?", default="all", choices=[*WORKLOADS, "all"])
    p.add_argument("--db", choices=["sqlite", "postgres", "both"], default="sqlite")
    p.add_argument("--quick", action="store_true", help="small sizes: every workload in seconds")
    p.add_argument("--only", choices=["reference", "hub"], help="measure one side only")
    size = p.add_argument_group("sizes")
    size.add_argument("--pairs", type=int, help="sender→receiver pairs (direct, latency; 50)")
    size.add_argument("--window", type=int, default=20, help="sent but not yet accepted, per pair")
    size.add_argument(
        "--messages", type=int, help="per pair (or fan-out sender): a count instead of --duration"
    )
    size.add_argument("--duration", type=float, help="measured seconds (default per workload)")
    size.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    size.add_argument(
        "--rate", type=float, default=1000.0, help="offered messages/s in total (latency)"
    )
    size.add_argument("--agents", type=int, help="fan-out receivers, idle connections, REST agents")
    size.add_argument("--fanout-window", type=int, default=4, help="broadcasts in flight (fan-out)")
    size.add_argument("--capabilities", type=int, default=100, help="distinct capabilities (REST)")
    size.add_argument("--page-size", type=int, default=50, help="discovery ?limit= (REST)")
    size.add_argument("--concurrency", type=int, default=8, help="concurrent HTTP clients (REST)")
    size.add_argument("--heartbeat-interval", type=int, help="seconds (idle; 30)")
    size.add_argument(
        # Below daphne's listen backlog (Twisted's default is 50), so a burst is not dropped.
        "--connect-concurrency",
        type=int,
        default=50,
        help="handshakes at once (idle)",
    )
    size.add_argument(
        "--idle-warm", type=int, default=50, help="connections before the memory baseline"
    )
    client = p.add_argument_group("client")
    client.add_argument("--client-procs", type=int, default=1, help="load-client processes")
    client.add_argument("--ack-every", type=int, default=10, help="ack after this many messages")
    client.add_argument("--ack-delay", type=float, default=0.02, help="or this many seconds")
    client.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds to wait after the window for the answers and deliveries still due",
    )
    client.add_argument("--timeout", type=float, default=900.0, help="limit of a --messages run")
    run = p.add_argument_group("run")
    run.add_argument(
        "--profile",
        choices=["cpu", "wall", "gil"],
        help="sample the hub with py-spy while measuring: on-CPU time, wall time with waits, or "
        "only the thread holding the interpreter lock",
    )
    run.add_argument(
        "--quiet-wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each server starts, wait up to this long for the machine to be quiet",
    )
    run.add_argument(
        "--quiet-threshold", type=float, default=0.3, help="cores busy that still count as quiet"
    )
    run.add_argument("--hub-env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                     help="extra environment for the hub (repeatable)")  # fmt: skip
    run.add_argument(
        "--pg-url", default="postgres://postgres@127.0.0.1:5432", help="server, no database"
    )
    run.add_argument("--keep", action="store_true", help="keep the temporary directories (logs)")
    run.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    run.add_argument("--no-save", action="store_true", help="print only; write no result file")
    run.add_argument(
        "--update-baseline", action="store_true", help="store the result in baseline.json"
    )
    return p


def _options(args, workload: str, db: str) -> argparse.Namespace:
    opts = argparse.Namespace(**vars(args))
    sizes = (QUICK if args.quick else DEFAULTS)[workload]
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(opts, name, value)
    opts.db = db
    opts.sides = [args.only] if args.only else ["reference", "hub"]
    opts.hub_env = dict(args.hub_env)
    opts.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return opts


def _params(opts, workload: str) -> dict:
    keys = {
        "direct": ["pairs", "window", "messages", "duration", "warmup", "ack_every", "ack_delay"],
        "latency": ["pairs", "window", "rate", "duration", "warmup", "ack_every", "ack_delay"],
        "fanout": [
            "agents",
            "fanout_window",
            "messages",
            "duration",
            "warmup",
            "ack_every",
            "ack_delay",
        ],
        "idle": [
            "agents",
            "heartbeat_interval",
            "connect_concurrency",
            "idle_warm",
            "duration",
            "warmup",
        ],
        "rest": ["agents", "capabilities", "page_size", "concurrency", "duration", "warmup"],
    }[workload]
    params = {key: getattr(opts, key) for key in keys}
    params.update(
        client_procs=opts.client_procs, quick=opts.quick, profile=opts.profile, hub_env=opts.hub_env
    )
    return params


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds through every context manager, which stop their processes


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    procstat.raise_nofile_limit()
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    try:
        for db in dbs:
            for workload in workloads:
                opts = _options(args, workload, db)
                print(
                    f"bench: {workload} on {db} ({', '.join(opts.sides)})",
                    file=sys.stderr,
                    flush=True,
                )
                outcome = WORKLOADS[workload](opts)
                result = report.compare(workload, db, _params(opts, workload), outcome["sides"])
                sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
                sys.stdout.flush()
                if not args.no_save:
                    path = report.write(result, opts.results_dir, opts.stamp)
                    print(f"bench: wrote {path}", file=sys.stderr)
                if args.update_baseline:
                    report.update_baseline(result)
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
