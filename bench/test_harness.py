"""The measuring parts of the suite: payloads, acks, percentiles, profiles, and one real run."""

import argparse
import asyncio

import orjson

from bench import client, profile, server, stats, workloads


def test_payloads_serialize_to_exactly_64_bytes():
    for t, n in [(1, 0), (123_456_789_012_345, 7), (9_999_999_999_999_999, 1_234_567)]:
        assert len(orjson.dumps(client.payload(t, n))) == client.PAYLOAD_BYTES


class RecordingSocket:
    """Stands in for the transport only: the ack logic under test is the real Peer's."""

    def __init__(self):
        self.sent = []

    async def send(self, data, text=None):
        self.sent.append(orjson.loads(data))


def _message(seq: int) -> dict:
    return {"type": "message", "seq": seq, "payload": client.payload(client.now_ns(), seq)}


async def test_a_receiver_never_acknowledges_past_a_gap():
    socket = RecordingSocket()
    peer = client.Peer(socket, client.Recorder(), ack_every=1)
    for seq in (1, 2, 4, 5):
        await peer._message(_message(seq), client.now_ns())
    assert socket.sent[-1] == {"type": "ack", "up_to_seq": 2}
    await peer._message(_message(3), client.now_ns())  # the late one arrives
    assert socket.sent[-1] == {"type": "ack", "up_to_seq": 5}
    assert peer.rec.delivered_total == 5 and peer.rec.duplicates == 0


async def test_a_receiver_counts_a_redelivered_message_as_a_duplicate():
    peer = client.Peer(RecordingSocket(), client.Recorder(), ack_every=0)
    for seq in (1, 2, 2, 1):
        await peer._message(_message(seq), client.now_ns())
    assert (peer.rec.delivered_total, peer.rec.duplicates) == (2, 2)


async def test_a_receiver_acknowledges_a_lone_message_after_the_delay():
    socket = RecordingSocket()
    peer = client.Peer(socket, client.Recorder(), ack_every=10, ack_delay=0.01)
    await peer._message(_message(1), client.now_ns())
    assert socket.sent == []
    await asyncio.sleep(0.05)
    assert socket.sent == [{"type": "ack", "up_to_seq": 1}]


def test_percentiles_are_nearest_rank():
    values = list(range(1, 101))
    assert stats.percentile(values, 50) == 50
    assert stats.percentile(values, 99) == 99
    assert stats.percentile(values, 100) == 100
    summary = stats.latency_ms([1000, 2000, 3000])
    assert (summary["p50"], summary["max"], summary["count"]) == (2.0, 3.0, 3)
    assert stats.ratio(1, 0) is None and stats.ratio(3, 2) == 1.5


def test_a_profile_summary_splits_own_and_inclusive_time(tmp_path):
    site = "/v/lib/python3.11/site-packages"
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"thread (1): MainThread;run ({site}/daphne/server.py:10);"
        f"receive ({site}/channels/consumer.py:5);send (/work/main/messaging/services.py:20) 30\n"
        f"thread (2): ThreadPoolExecutor-7_0;run ({site}/daphne/server.py:11);"
        f"receive ({site}/channels/consumer.py:6) 10\n"
        "thread (3): ThreadPoolExecutor-8_0;Condition.wait (threading.py:327) 10\n"
    )
    summary = profile.summarize(raw)
    assert (summary["samples"], summary["waiting_percent"]) == (50, 20.0)
    top = summary["by_own_time"][0]
    assert top == {"function": "send (messaging/services.py)", "percent": 60.0}
    assert summary["by_inclusive_time"] == [
        {"function": "receive (channels/consumer.py)", "percent": 80.0},
        {"function": "send (messaging/services.py)", "percent": 60.0},
    ]
    assert summary["by_package"] == [
        {"function": "messaging", "percent": 60.0},
        {"function": "channels", "percent": 20.0},
    ]
    assert summary["by_thread"] == [
        {"function": "MainThread", "percent": 60.0},
        {"function": "ThreadPoolExecutor", "percent": 40.0},
    ]


def test_a_short_direct_run_against_the_reference_delivers_everything_it_accepted(tmp_path):
    opts = argparse.Namespace(
        pairs=3, window=5, messages=None, warmup=0.2, duration=1.0, ack_every=10, ack_delay=0.02,
        drain_timeout=10.0, client_procs=2, profile=None, results_dir=tmp_path, db="sqlite",
        stamp="t", keep=False,
    )  # fmt: skip
    with server.reference_server(agents=workloads.pair_agents(opts.pairs)) as srv:
        figures = workloads.measure_pairs(srv, opts, rate=None, label="direct")
    assert figures["delivered"] > 0 and figures["delivered_per_s"] > 0
    assert figures["undelivered"] == 0 and figures["drain_complete"]
    assert figures["errors"] == {}
    assert figures["accepted_total"] == figures["sent_total"] == figures["delivered_total"]
    assert figures["latency_ms"]["p99"] is not None
    assert figures["client"]["procs"] == 2


def test_the_comparison_marks_a_figure_that_got_worse_beyond_the_tolerance():
    from bench import compare

    def run(hub_rate, hub_p99):
        return {
            "reference": {"delivered_per_s": 1000.0, "latency_ms": {"p99": 2.0}},
            "hub": {"delivered_per_s": hub_rate, "latency_ms": {"p99": hub_p99}},
        }

    before = {"runs": {"direct-sqlite": run(100.0, 50.0)}}
    after = {"runs": {"direct-sqlite": run(85.0, 40.0)}}
    table = {row[2]: row for row in compare.rows(before, after, tolerance=0.10)}
    assert table["delivered_per_s"][6] == "85 ⚠"  # 15% fewer: worse than the tolerance
    assert table["latency_ms.p99"][6] == "40"  # lower latency is better: no mark
    assert table["delivered_per_s"][7:] == ["0.1", "0.085"]
    assert "| direct | sqlite | delivered_per_s |" in compare.markdown(list(table.values()))
