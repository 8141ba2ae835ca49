"""Production settings that are unsafe stop `manage.py check` and stop a server from starting.

Each case runs the real entry point in a subprocess with the environment an operator would set.
"""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from agents.checks import refuse_unsafe_production
from mcp_project import serve
from tests.e2e.harness import embedded_redis, http

ROOT = Path(__file__).resolve().parents[2]
APPLICATION = "mcp_project.asgi:application"
STRONG_KEY = "k" * 24 + "-production-secret-key-of-64-characters-00000000"

SAFE = {
    "HUB_PRODUCTION": "1",
    "DJANGO_DEBUG": "0",
    "DJANGO_SECRET_KEY": STRONG_KEY,
    "DJANGO_ALLOWED_HOSTS": "hub.example.com,127.0.0.1",
    "HUB_CHANNEL_LAYER": "redis",
    "HUB_METRICS_TOKEN": "metrics-token-for-tests",
    "HUB_LOG_LEVEL": "WARNING",
}

UNSAFE = {
    "hub.E001": {"DJANGO_DEBUG": "1"},
    "hub.E002": {"DJANGO_SECRET_KEY": None},  # unset: the development default
    "hub.E003": {"DJANGO_ALLOWED_HOSTS": "*"},
    "hub.E004": {"HUB_CHANNEL_LAYER": "memory"},
    "hub.E005": {"JWT_SIGNING_KEY": "short"},
}


def environment(changes: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "HUB_", "JWT_"))}
    env.update(SAFE)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def manage_check(changes: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=environment(changes),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def checks() -> dict[str, subprocess.CompletedProcess]:
    """Run `manage.py check` once per case, all at once (each start costs about a second)."""
    cases = {
        "safe": {},
        "development": {"HUB_PRODUCTION": "0", "DJANGO_DEBUG": "1", "DJANGO_SECRET_KEY": None},
        **UNSAFE,
    }
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = pool.map(manage_check, cases.values())
        return dict(zip(cases, results, strict=True))


def test_the_check_passes_with_safe_production_settings(checks):
    result = checks["safe"]
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize("error_id", sorted(UNSAFE))
def test_the_check_refuses_each_unsafe_production_setting(checks, error_id):
    result = checks[error_id]
    assert result.returncode != 0
    assert error_id in result.stderr


def test_the_check_lets_development_run_with_development_settings(checks):
    result = checks["development"]
    assert result.returncode == 0, result.stderr


def test_the_asgi_startup_refuses_unsafe_settings_in_production(settings):
    settings.HUB_PRODUCTION = True
    settings.DEBUG = True
    with pytest.raises(ImproperlyConfigured, match=r"hub\.E001"):
        refuse_unsafe_production()
    settings.HUB_PRODUCTION = False
    refuse_unsafe_production()  # development: never refuses


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_daphne_refuses_to_start_with_unsafe_settings_and_starts_with_safe_ones(tmp_path):
    def daphne(changes: dict) -> tuple[subprocess.Popen, int]:
        port = embedded_redis.free_port()
        env = environment({**changes, "SQLITE_PATH": str(tmp_path / "hub.sqlite3")})
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        proc = subprocess.Popen(
            serve.command("-b", "127.0.0.1", "-p", str(port), APPLICATION),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return proc, port

    unsafe, _ = daphne({"DJANGO_DEBUG": "1"})
    safe, port = daphne({})
    try:
        output, _ = unsafe.communicate(timeout=60)
        assert unsafe.returncode != 0
        assert "Refusing to start with unsafe production settings" in output
        assert "hub.E001" in output
        deadline = time.monotonic() + 60
        while True:
            assert safe.poll() is None, safe.stdout.read()
            try:
                if http("GET", f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the safe server did not answer /healthz"
            time.sleep(0.1)
    finally:
        for proc in (unsafe, safe):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
