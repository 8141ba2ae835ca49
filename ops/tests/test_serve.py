"""mcp_project.serve: daphne on uvloop's event loop, or asyncio's when asked."""

import json
import os
import subprocess
import sys

from django.conf import settings

# What loop daphne's server module creates once the start command has chosen.
PROBE = """
import json
from mcp_project import serve
chosen = serve.install_event_loop()
import daphne.server
print(json.dumps([chosen, type(daphne.server.twisted_loop).__module__]))
"""


def loop_daphne_gets(**env) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=settings.BASE_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_daphne_runs_on_uvloop():
    assert loop_daphne_gets() == ["uvloop", "uvloop"]


def test_hub_event_loop_asyncio_keeps_asyncios_own_loop():
    chosen, module = loop_daphne_gets(HUB_EVENT_LOOP="asyncio")
    assert chosen == "asyncio" and module.startswith("asyncio")
