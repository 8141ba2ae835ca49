import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db.migrations.recorder import MigrationRecorder

from mcp_project import health
from ops import shutdown

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_migration_check(monkeypatch):
    # The positive answer is cached for the life of a process; each test asks anew.
    monkeypatch.setattr(health, "_migrations_applied", False)


def test_healthz_answers_while_the_process_runs(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


@pytest.mark.django_db
def test_readyz_is_ok_when_database_redis_and_migrations_are(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {
        "database": True,
        "redis": True,
        "migrations": True,
        "accepting": True,
    }


@pytest.mark.django_db
def test_readyz_names_redis_when_it_does_not_answer(client, settings):
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]},
        }
    }
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failed"] == ["redis"]


@pytest.mark.django_db
def test_readyz_names_migrations_when_one_is_not_applied(client):
    MigrationRecorder.Migration.objects.filter(app="ops", name="0001_initial").delete()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failed"] == ["migrations"]


@pytest.mark.django_db
def test_readyz_fails_once_a_graceful_shutdown_began(client, monkeypatch):
    monkeypatch.setattr(shutdown, "draining", True)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failed"] == ["accepting"]


@pytest.mark.django_db
def test_hub_status_prints_the_checks_and_the_cluster(capsys, alice):
    call_command("hub_status")
    out = capsys.readouterr().out
    assert "status: ok" in out
    assert "database" in out and "migrations" in out
    assert "agents: 0 online, 1 offline" in out
    assert "messaging.tasks.redeliver_due" in out


@pytest.mark.django_db
def test_hub_status_json_is_the_readyz_report_with_details(capsys):
    call_command("hub_status", "--json")
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "ok"
    assert report["checks"]["redis"] is True
    assert report["details"]["agents_online"] == 0


def test_hub_status_exits_1_naming_the_unreachable_parts():
    env = {
        **os.environ,
        "DATABASE_URL": "postgres://postgres@127.0.0.1:1/nowhere",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "DJANGO_SETTINGS_MODULE": "mcp_project.settings",
        "HUB_LOG_LEVEL": "CRITICAL",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "hub_status", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "unavailable"
    assert report["failed"] == ["database", "redis", "migrations"]
    assert report["details"] is None
