"""Fixtures of the operations tests."""

import io
import json
import logging
import subprocess
import sys
import uuid

import pytest
from django.conf import settings
from prometheus_client import REGISTRY

from mcp_project.logging import formatter
from ops.metrics import CLUSTER_COLLECTOR, server_name


@pytest.fixture(autouse=True)
def isolated_channel_layer(settings):
    """Give each test its own key prefix in Redis, so no group or channel leaks between tests."""
    layers = {alias: {**config} for alias, config in settings.CHANNEL_LAYERS.items()}
    default = layers["default"]
    if "CONFIG" in default:
        default["CONFIG"] = {**default["CONFIG"], "prefix": f"test-{uuid.uuid4().hex[:12]}"}
    settings.CHANNEL_LAYERS = layers
    return layers


@pytest.fixture(autouse=True)
def fresh_cluster_metrics():
    """Each test reads the database anew instead of a previous test's cached scrape."""
    CLUSTER_COLLECTOR.invalidate()


class Samples:
    """Read this process's metrics, relative to when the test started (counters only grow)."""

    def __init__(self):
        self.server = server_name()
        self._start = {}

    def value(self, name: str, **labels) -> float:
        labels = {"server": self.server, **labels}
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def mark(self, name: str, **labels) -> None:
        self._start[(name, tuple(sorted(labels.items())))] = self.value(name, **labels)

    def delta(self, name: str, **labels) -> float:
        start = self._start.get((name, tuple(sorted(labels.items()))), 0.0)
        return self.value(name, **labels) - start


@pytest.fixture
def samples() -> Samples:
    return Samples()


class JsonLog:
    """Every log record written while the fixture is active, rendered as the JSON formatter does."""

    def __init__(self, stream: io.StringIO):
        self.stream = stream

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]

    def events(self, event: str) -> list[dict]:
        return [line for line in self.lines() if line.get("event") == event]


@pytest.fixture
def json_log():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("json"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield JsonLog(stream)
    root.removeHandler(handler)
    root.setLevel(previous_level)


def last_line_of(code: str) -> str:
    """Run Python code in a process of its own, from the project's folder, and return the last
    line it printed (loading the ASGI application, say, tunes the process's collector)."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]
