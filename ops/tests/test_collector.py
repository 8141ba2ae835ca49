"""The server process's garbage collector: start-up heap frozen, young generation less often."""

import json
import subprocess
import sys

import pytest
from django.conf import settings

from ops.collector import SERVING_SWITCH_INTERVAL, SERVING_THRESHOLDS

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
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=settings.BASE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    state = json.loads(out.stdout.strip().splitlines()[-1])
    # Django, DRF, Channels and the project: far more than any handful of objects.
    assert state["frozen"] > 50_000
    assert tuple(state["thresholds"]) == SERVING_THRESHOLDS
    assert state["switch_interval"] == pytest.approx(SERVING_SWITCH_INTERVAL) != 0.005
