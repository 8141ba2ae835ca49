"""Tally and TallyHistogram: counts kept as plain numbers, scraped as Prometheus counters and
histograms exactly like prometheus_client's own."""

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ops.metrics import Tally, TallyHistogram, server_name

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def exposition(registry) -> list[str]:
    return sorted(generate_latest(registry).decode().splitlines())


def test_a_tally_scrapes_as_the_counter_it_stands_for():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = Tally("hub_frames", "Frames, by type.", ["type"], registry=ours)
    counter = Counter("hub_frames", "Frames, by type.", ["server", "type"], registry=theirs)
    for frame_type in ["send", "ack", "send", "heartbeat", "send"]:
        tally.inc(frame_type)
        counter.labels(server_name(), frame_type).inc()
    tally.inc("ack", amount=2.5)
    counter.labels(server_name(), "ack").inc(2.5)
    assert exposition(ours) == exposition(theirs)
    assert f'hub_frames_total{{server="{server_name()}",type="send"}} 3.0' in exposition(ours)


def test_a_tally_without_labels_scrapes_nothing_until_counted():
    registry = CollectorRegistry()
    tally = Tally("hub_delivered", "Delivered.", registry=registry)
    assert not [line for line in exposition(registry) if not line.startswith("#")]
    tally.inc()
    assert f'hub_delivered_total{{server="{server_name()}"}} 1.0' in exposition(registry)


def test_a_tally_histogram_scrapes_as_the_histogram_it_stands_for():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = TallyHistogram("hub_latency_seconds", "Latency.", buckets=BUCKETS, registry=ours)
    histogram = Histogram(
        "hub_latency_seconds", "Latency.", ["server"], buckets=BUCKETS, registry=theirs
    )
    # Values on the bounds too: a bucket counts what is at most its bound.
    values = [0.0, 0.001, 0.0025, 1, 300, 301, *(random.uniform(0, 400) for _ in range(500))]
    for value in values:
        tally.observe(value)
        histogram.labels(server_name()).observe(value)
    assert exposition(ours) == [line for line in exposition(theirs) if "_created" not in line]
