"""The workloads: each starts the reference hub and then the hub, drives both with the same client
processes, and returns one comparison (see report.py).

direct   sender→receiver pairs, at most `window` sent-but-not-accepted per pair, every message
         acknowledged by its receiver; throughput.
latency  the same pairs at a fixed total offered rate; latency.
fanout   one sender and N receivers: broadcasts, then a topic all N subscribe to.
idle     N agents connected and sending heartbeats; memory per connection, connect rate.
rest     discovery by capability over N registered agents; requests/s and latency.
"""

import contextlib
import sys
import time
from pathlib import Path

from . import client, procstat, server, stats
from .profile import Profiler, summarize
from .workers import Workers, split

NS = 1_000_000_000
CONNECT_TIMEOUT = 3600.0  # seconds for all client connections to open (a hang, not a slow hub)


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def wait_for_quiet(opts) -> None:
    """On a shared machine, wait (up to --quiet-wait seconds) until other work has calmed down."""
    if not opts.quiet_wait:
        return
    deadline = time.monotonic() + opts.quiet_wait
    while True:
        busy = procstat.other_busy_cores()
        if busy <= opts.quiet_threshold:
            return
        if time.monotonic() > deadline:
            print(
                f"bench: machine still busy ({busy:.2f} cores); measuring anyway", file=sys.stderr
            )
            return
        print(f"bench: machine busy ({busy:.2f} cores); waiting", file=sys.stderr, flush=True)
        time.sleep(10)


@contextlib.contextmanager
def start_server(kind: str, opts, agents: list[dict], *, env: dict | None = None):
    wait_for_quiet(opts)
    if kind == "reference":
        with server.reference_server(agents=agents, keep=opts.keep) as srv:
            yield srv
    else:
        extra = {**(env or {}), **opts.hub_env}
        with server.hub_server(
            agents=agents, db=opts.db, pg_url=opts.pg_url, extra_env=extra, keep=opts.keep
        ) as srv:
            yield srv


class ServerMeter:
    """CPU seconds of the server (and of its Redis and PostgreSQL backends) over a window."""

    def __init__(self, srv: server.Server):
        self.srv = srv
        self.cpu = procstat.CpuMeter(lambda: [srv.pid])
        self.helpers = {
            name: procstat.CpuMeter(lambda name=name: srv.helper_pids().get(name, []))
            for name in srv.helper_pids()
        }
        self.began = self.ended = 0.0
        self.busy = 0.0

    def begin(self) -> None:
        self.began = time.monotonic()
        self.busy = procstat.machine_busy_seconds()
        self.cpu.begin()
        for meter in self.helpers.values():
            meter.begin()

    def end(self) -> None:
        self.ended = time.monotonic()
        self.busy = procstat.machine_busy_seconds() - self.busy
        self.cpu.end()
        for meter in self.helpers.values():
            meter.end()

    def figures(self, client_utils=()) -> dict:
        wall = max(self.ended - self.began, 1e-9)
        cpu = self.cpu.seconds()
        memory = self.srv.memory()
        helpers = sum(meter.seconds() for meter in self.helpers.values())
        figures = {
            "cpu_s": round(cpu, 2),
            "cpu_s_with_helpers": round(cpu + helpers, 2),
            "cpu_util": round(cpu / wall, 3),
            "peak_rss_mb": stats.rounded(memory["peak_rss_mb"]),
            "rss_mb": stats.rounded(memory["rss_mb"]),
        }
        if self.helpers:
            figures["helpers_cpu_s"] = {
                name: round(meter.seconds(), 2) for name, meter in self.helpers.items()
            }
        # Cores busy with anything but the server, its helpers and the load client: other work on
        # the machine competing for CPU. Well above zero, the figures are noisy.
        ours = cpu + helpers + sum(u for u in client_utils if u is not None) * wall
        figures["other_busy_cores"] = round(max(self.busy - ours, 0.0) / wall, 2)
        return figures


class MaybeProfiler:
    """py-spy on the hub over the measured window, when --profile asks for it."""

    def __init__(self, opts, srv: server.Server, label: str):
        self.profiler = None
        if opts.profile and srv.kind == "hub":
            out = Path(opts.results_dir) / f"profile-{label}-{opts.db}-{opts.stamp}.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            self.profiler = Profiler(
                srv.pid, out, idle=opts.profile == "wall", gil=opts.profile == "gil"
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.profiler:
            self.profiler.kill()

    def start(self) -> None:
        if self.profiler:
            self.profiler.start()

    def stop(self) -> dict | None:
        if not self.profiler:
            return None
        self.profiler.stop()
        return summarize(self.profiler.out)


def _client_figures(results: list[dict]) -> dict:
    utils = [r["client_cpu_util"] for r in results if r.get("client_cpu_util") is not None]
    return {
        "procs": len(results),
        "cpu_util": [round(u, 3) for u in utils],
        # A load client near one full core is likely the bottleneck, not the server.
        "saturated": any(u > 0.9 for u in utils),
    }


def _merge_counts(dicts) -> dict:
    merged: dict[str, int] = {}
    for item in dicts:
        for key, value in item.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def _message_figures(results: list[dict], meter: ServerMeter, span_s: float) -> dict:
    delivered = sum(r["delivered"] for r in results)
    expected = sum(r["expected_total"] for r in results)
    delivered_total = sum(r["delivered_total"] for r in results)
    figures = {
        "delivered_per_s": round(delivered / span_s, 1),
        "accepted_per_s": round(sum(r["accepted"] for r in results) / span_s, 1),
        "latency_ms": stats.latency_ms(stats.merge(r["latencies_us"] for r in results)),
        "measured_s": round(span_s, 2),
        "delivered": delivered,
        "sent_total": sum(r["sent_total"] for r in results),
        "accepted_total": sum(r["accepted_total"] for r in results),
        "delivered_total": delivered_total,
        # Accepted but not seen by its recipient when the drain ended (--drain-timeout): with
        # drain_complete true this is 0; a message still missing then is lost.
        "undelivered": max(expected - delivered_total, 0),
        "drain_complete": all(r["drain_complete"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "errors": _merge_counts(r["errors"] for r in results),
        "connect_retries": sum(r.get("connect_retries", 0) for r in results),
        "server": meter.figures([r.get("client_cpu_util") for r in results]),
        "client": _client_figures(results),
    }
    if delivered:
        # CPU time per delivered message: unlike a rate, hardly changed by other work competing
        # for the cores, so it compares runs on a busy machine. 1e6 / it is a one-core ceiling.
        server = figures["server"]
        figures["cpu_us_per_message"] = {
            "server": round(server["cpu_s"] * 1e6 / delivered, 1),
            "server_with_helpers": round(server["cpu_s_with_helpers"] * 1e6 / delivered, 1),
            "client": round(sum(figures["client"]["cpu_util"]) * span_s * 1e6 / delivered, 1),
        }
    return figures


def _run_measured(srv, opts, worker, configs, *, label: str, messages_mode: bool) -> dict:
    """Run workers through connect → start → window and return (results, meter, span)."""
    meter = ServerMeter(srv)
    with Workers(worker, configs) as workers, MaybeProfiler(opts, srv, label) as profiler:
        workers.sync(timeout=CONNECT_TIMEOUT)
        start = workers.start()
        if messages_mode:
            meter.begin()
            profiler.start()
            results = workers.results(timeout=opts.timeout)
            meter.end()
            profile = profiler.stop()
            first = start * NS
            last = max(r["last_receipt_ns"] for r in results)
            span = max((last - first) / NS, 1e-9)
        else:
            _sleep_until(start + opts.warmup)
            meter.begin()
            profiler.start()
            _sleep_until(start + opts.warmup + opts.duration)
            meter.end()
            profile = profiler.stop()
            results = workers.results(timeout=opts.drain_timeout + opts.duration)
            span = opts.duration
    figures = _message_figures(results, meter, span)
    if profile:
        figures["profile"] = profile
    return figures


# --- direct and latency ---------------------------------------------------------------------------


def pair_agents(pairs: int) -> list[dict]:
    senders = [{"agent_id": f"bench-s{i:05d}"} for i in range(pairs)]
    receivers = [{"agent_id": f"bench-r{i:05d}"} for i in range(pairs)]
    return senders + receivers


def measure_pairs(srv: server.Server, opts, *, rate: float | None, label: str) -> dict:
    n = opts.pairs
    pairs = list(zip(srv.agents[:n], srv.agents[n : 2 * n], strict=True))
    configs = [
        {
            "target": srv.target(),
            "pairs": chunk,
            "window": opts.window,
            "warmup": opts.warmup,
            "duration": opts.duration,
            "messages": opts.messages,
            "rate_per_pair": rate / n if rate else None,
            "ack_every": opts.ack_every,
            "ack_delay": opts.ack_delay,
            "drain_timeout": opts.drain_timeout,
        }
        for chunk in split(pairs, opts.client_procs)
    ]
    messages_mode = bool(opts.messages) and not rate
    return _run_measured(
        srv, opts, client.direct_worker, configs, label=label, messages_mode=messages_mode
    )


def run_direct(opts) -> dict:
    sides = {}
    for kind in opts.sides:
        with start_server(kind, opts, pair_agents(opts.pairs)) as srv:
            sides[kind] = measure_pairs(srv, opts, rate=None, label="direct")
    return {"sides": sides}


def run_latency(opts) -> dict:
    sides = {}
    for kind in opts.sides:
        with start_server(kind, opts, pair_agents(opts.pairs)) as srv:
            figures = measure_pairs(srv, opts, rate=opts.rate, label="latency")
            figures["offered_per_s"] = opts.rate
            # A server that falls behind the offered rate measures its queue, not its latency.
            figures["keeps_up"] = figures["delivered_per_s"] >= 0.95 * opts.rate
            sides[kind] = figures
    return {"sides": sides}


# --- fan-out --------------------------------------------------------------------------------------

FANOUT_TOPIC = "bench.fanout"


def fanout_agents(receivers: int) -> list[dict]:
    return [{"agent_id": "bench-sender"}] + [
        {"agent_id": f"bench-f{i:05d}"} for i in range(receivers)
    ]


def measure_fanout(srv: server.Server, opts, mode: str) -> dict:
    sender, receivers = srv.agents[0], srv.agents[1:]
    chunks = split(receivers, opts.client_procs)
    configs = [
        {
            "target": srv.target(),
            "sender": sender if index == 0 else None,
            "receivers": chunk,
            "mode": mode,
            "topic": FANOUT_TOPIC,
            "window": opts.fanout_window,
            "warmup": opts.warmup,
            "duration": opts.duration,
            "messages": opts.messages,
            "ack_every": opts.ack_every,
            "ack_delay": opts.ack_delay,
            "drain_timeout": opts.drain_timeout,
            "workers": len(chunks),
        }
        for index, chunk in enumerate(chunks)
    ]
    figures = _run_measured(
        srv,
        opts,
        client.fanout_worker,
        configs,
        label=f"fanout-{mode}",
        messages_mode=bool(opts.messages),
    )
    figures["recipients"] = len(receivers)
    figures["messages_per_s"] = figures.pop("accepted_per_s")
    return figures


def run_fanout(opts) -> dict:
    sides = {}
    for kind in opts.sides:
        with start_server(kind, opts, fanout_agents(opts.agents)) as srv:
            sides[kind] = {mode: measure_fanout(srv, opts, mode) for mode in ("broadcast", "topic")}
    return {"sides": sides}


# --- idle -----------------------------------------------------------------------------------------


def idle_agents(count: int) -> list[dict]:
    return [{"agent_id": f"bench-i{i:05d}"} for i in range(count)]


def measure_idle(srv: server.Server, opts) -> dict:
    agents = srv.agents
    warm = min(opts.idle_warm, len(agents) // 2)
    procs = split(list(range(len(agents))), opts.client_procs)
    configs = []
    for chunk in procs:
        chunk_agents = [agents[i] for i in chunk]
        chunk_warm = warm // len(procs)
        configs.append(
            {
                "target": srv.target(),
                "agents": chunk_agents,
                "warm": chunk_warm,
                "concurrency": opts.connect_concurrency,
                "warmup": opts.warmup,
                "duration": opts.duration,
                "heartbeat_interval": opts.heartbeat_interval,
            }
        )
    warm_total = sum(c["warm"] for c in configs)
    meter = ServerMeter(srv)
    with (
        Workers(client.idle_worker, configs) as workers,
        MaybeProfiler(opts, srv, "idle-connect") as connect_profiler,
        MaybeProfiler(opts, srv, "idle") as profiler,
    ):
        workers.sync(timeout=CONNECT_TIMEOUT)
        time.sleep(1.0)  # let the warm-up sessions settle before reading the baseline
        before = srv.memory()
        connect_cpu = procstat.cpu_seconds(srv.pid)
        connect_profiler.start()
        workers.sync()  # the rest connect now
        workers.sync(timeout=CONNECT_TIMEOUT)  # every worker has connected everyone
        connect_cpu = procstat.cpu_seconds(srv.pid) - connect_cpu
        connect_profile = connect_profiler.stop()
        time.sleep(1.0)
        connected = srv.memory()
        start = workers.start()
        _sleep_until(start + opts.warmup)
        meter.begin()
        profiler.start()
        _sleep_until(start + opts.warmup + opts.duration)
        meter.end()
        profile = profiler.stop()
        workers.sync(timeout=60)  # clients still connected
        after = srv.memory()
        results = workers.results(timeout=60)
    added = sum(r["connections"] for r in results) - warm_total
    connect_s = max(r["connected_in_s"] for r in results)
    per_connection_kb = (connected["rss_mb"] - before["rss_mb"]) * 1024 / max(added, 1)
    heartbeats = stats.merge(r["heartbeat_latencies_us"] for r in results)
    figures = {
        "connections": added + warm_total,
        "rss_per_connection_kb": round(per_connection_kb, 1),
        "connect_per_s": round(added / connect_s, 1) if connect_s else None,
        "connect_latency_ms": stats.latency_ms(
            # A failed connection has no time (0).
            [t for t in stats.merge(r["connect_latencies_us"] for r in results) if t > 0]
        ),
        "connect_server_cpu_s": round(connect_cpu, 2),
        "rss_mb": {
            "before": stats.rounded(before["rss_mb"]),
            "connected": stats.rounded(connected["rss_mb"]),
            "after_heartbeats": stats.rounded(after["rss_mb"]),
        },
        "heartbeats_sent_per_s": round(
            sum(r["heartbeats_sent"] for r in results) / opts.duration, 1
        ),
        # Answers that arrived inside the window; fewer than sent means the server fell behind.
        "heartbeat_acks_per_s": round(len(heartbeats) / opts.duration, 1),
        "heartbeat_latency_ms": stats.latency_ms(heartbeats),
        "closed_early": sum(r["closed_early"] for r in results),
        "connect_failures": sum(r["connect_failures"] for r in results),
        "connect_retries": sum(r["connect_retries"] for r in results),
        "connect_errors": _merge_counts(r["connect_errors"] for r in results),
        "errors": _merge_counts(r["errors"] for r in results),
        "server": meter.figures([r.get("client_cpu_util") for r in results]),
        "client": _client_figures(results),
    }
    if connect_profile:
        figures["profile_connect"] = connect_profile
    if profile:
        figures["profile"] = profile
    return figures


def run_idle(opts) -> dict:
    sides = {}
    env = {"HUB_HEARTBEAT_INTERVAL": str(opts.heartbeat_interval)}
    for kind in opts.sides:
        with start_server(kind, opts, idle_agents(opts.agents), env=env) as srv:
            sides[kind] = measure_idle(srv, opts)
    return {"sides": sides}


# --- REST -----------------------------------------------------------------------------------------


def rest_agents(count: int, capabilities: int) -> list[dict]:
    # Every capability is held by count/capabilities agents; a second one makes profiles realistic.
    return [
        {
            "agent_id": f"bench-a{i:05d}",
            "capabilities": [f"cap-{i % capabilities:03d}", f"lang-{i % 7}"],
        }
        for i in range(count)
    ]


def measure_rest(srv: server.Server, opts) -> dict:
    paths = [
        f"/api/v1/agents/?capability=cap-{k:03d}&limit={opts.page_size}"
        for k in range(opts.capabilities)
    ]
    token = srv.agents[0].get("access")
    configs = [
        {
            "target": srv.target(),
            "token": token,
            "paths": paths,
            "concurrency": max(1, chunk),
            "warmup": opts.warmup,
            "duration": opts.duration,
        }
        for chunk in (len(c) for c in split(list(range(opts.concurrency)), opts.client_procs))
    ]
    meter = ServerMeter(srv)
    with (
        Workers(client.rest_worker, configs) as workers,
        MaybeProfiler(opts, srv, "rest") as profiler,
    ):
        workers.sync(timeout=CONNECT_TIMEOUT)
        start = workers.start()
        _sleep_until(start + opts.warmup)
        meter.begin()
        profiler.start()
        _sleep_until(start + opts.warmup + opts.duration)
        meter.end()
        profile = profiler.stop()
        results = workers.results(timeout=opts.duration + 60)
    requests = sum(r["requests"] for r in results)
    figures = {
        "requests_per_s": round(requests / opts.duration, 1),
        "latency_ms": stats.latency_ms(stats.merge(r["latencies_us"] for r in results)),
        "requests": requests,
        "statuses": _merge_counts(r["statuses"] for r in results),
        "matching_agents": results[0]["sample_count"],
        "results_per_page": results[0]["sample_results"],
        "server": meter.figures([r.get("client_cpu_util") for r in results]),
        "client": _client_figures(results),
    }
    if profile:
        figures["profile"] = profile
    return figures


def run_rest(opts) -> dict:
    sides = {}
    for kind in opts.sides:
        with start_server(kind, opts, rest_agents(opts.agents, opts.capabilities)) as srv:
            sides[kind] = measure_rest(srv, opts)
    return {"sides": sides}


WORKLOADS = {
    "direct": run_direct,
    "latency": run_latency,
    "fanout": run_fanout,
    "idle": run_idle,
    "rest": run_rest,
}
