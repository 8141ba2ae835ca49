"""The server process's garbage collector: start-up heap frozen, young generation less often."""

import json

import pytest

from ops.collector import SERVING_SWITCH_INTERVAL, SERVING_THRESHOLDS

from .conftest import last_line_of

PROBE = """
import gc, json, sys
import mcp_project.asgi
print(json.dumps({
    "frozen": gc.get_freeze_count(),
    "thresholds": gc.get_threshold(),
    "switch_interval": sys.getswitchinterval(),
}))
"""


def test_loading_the_asgi_application_freezes_the_start_up_heap():
    # A process of its own: this one's collector is pytest's business.
    state = json.loads(last_line_of(PROBE))
    # Django, DRF, Channels and the project: far more than any handful of objects.
    assert state["frozen"] > 50_000
    assert tuple(state["thresholds"]) == SERVING_THRESHOLDS
    assert state["switch_interval"] == pytest.approx(SERVING_SWITCH_INTERVAL) != 0.005
