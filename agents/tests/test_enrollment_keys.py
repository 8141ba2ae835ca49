"""Enrollment keys: made by operators (service and management command), spent by registering."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from rest_framework.test import APIClient

from agents import services
from agents.models import EnrollmentKey, digest


def create_key(*args) -> tuple[str, str]:
    """Run the management command; return its whole output and its last line."""
    out = StringIO()
    call_command("create_enrollment_key", *args, stdout=out)
    output = out.getvalue()
    return output, output.rstrip("\n").splitlines()[-1]


def register(agent_id: str, raw_key: str):
    return APIClient().post(
        "/api/v1/agents/", {"agent_id": agent_id}, format="json", HTTP_X_ENROLLMENT_KEY=raw_key
    )


# --- The service --------------------------------------------------------------------------------


def test_it_stores_only_a_digest_and_a_short_prefix_of_a_key(db):
    key, raw = services.enrollment_key_create(label="fleet A", max_uses=3)
    assert raw.startswith("ek_") and len(raw) > 40
    assert key.key_digest == digest(raw)
    assert key.prefix == raw[:11] and raw not in (key.prefix, key.key_digest)
    assert key.get_status() == "usable" and key.uses == 0


def test_each_key_is_different(db):
    raws = {services.enrollment_key_create()[1] for _ in range(5)}
    assert len(raws) == 5


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({}, "usable"),
        ({"max_uses": 1, "uses": 1}, "spent"),
        ({"expires_at": timezone.now() - timedelta(seconds=1)}, "expired"),
        ({"revoked_at": timezone.now()}, "revoked"),
        # Revocation is the strongest reason and is reported first.
        ({"revoked_at": timezone.now(), "max_uses": 1, "uses": 1}, "revoked"),
    ],
)
def test_a_key_status_agrees_with_the_usable_queryset(db, fields, status):
    key, _ = services.enrollment_key_create()
    EnrollmentKey.objects.filter(pk=key.pk).update(**fields)
    key.refresh_from_db()
    assert key.get_status() == status
    assert EnrollmentKey.objects.usable().filter(pk=key.pk).exists() == (status == "usable")


def test_consuming_counts_uses_until_spent(db):
    key, raw = services.enrollment_key_create(max_uses=2)
    services.enrollment_key_consume(raw=raw)
    services.enrollment_key_consume(raw=raw)
    with pytest.raises(services.EnrollmentRefused) as refused:
        services.enrollment_key_consume(raw=raw)
    assert refused.value.code == "enrollment_key_spent" and refused.value.status == 403
    key.refresh_from_db()
    assert key.uses == 2


def test_consuming_an_unknown_key_is_a_401(db):
    with pytest.raises(services.EnrollmentRefused) as refused:
        services.enrollment_key_consume(raw="ek_unknown")
    assert refused.value.status == 401


def test_a_revoked_key_admits_nobody(db):
    key, raw = services.enrollment_key_create()
    assert register("first", raw).status_code == 201
    services.enrollment_key_revoke(key=key)
    response = register("second", raw)
    assert response.status_code == 403
    assert response.json()["code"] == "enrollment_key_revoked"


def test_a_key_without_a_limit_admits_many(db):
    _, raw = services.enrollment_key_create()
    for n in range(5):
        assert register(f"agent-{n}", raw).status_code == 201
    assert EnrollmentKey.objects.get().uses == 5


# --- The management command ---------------------------------------------------------------------


def test_the_command_prints_a_working_key_as_its_last_line(db):
    output, raw = create_key("--uses", "2")
    assert raw.startswith("ek_")
    key = EnrollmentKey.objects.get()
    assert key.key_digest == digest(raw) and key.max_uses == 2 and key.expires_at is None
    assert "2 use(s)" in output and "no expiry" in output
    assert register("first", raw).status_code == 201
    assert register("second", raw).status_code == 201
    assert register("third", raw).status_code == 403


def test_the_command_sets_an_expiry(db):
    before = timezone.now()
    output, raw = create_key("--expires-in", "3600", "--label", "night shift")
    key = EnrollmentKey.objects.get(key_digest=digest(raw))
    assert key.label == "night shift" and key.max_uses is None
    assert before + timedelta(seconds=3599) <= key.expires_at <= timezone.now() + timedelta(hours=1)
    assert "expires" in output and "unlimited uses" in output
    assert register("early", raw).status_code == 201


def test_a_key_from_the_command_stops_working_when_it_expires(db):
    _, raw = create_key("--expires-in", "60", "--uses", "5")
    # Moving the expiry into the past stands in for waiting a minute.
    EnrollmentKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = register("late", raw)
    assert response.status_code == 403
    assert response.json()["code"] == "enrollment_key_expired"


def test_the_command_keeps_the_key_out_of_everything_but_its_last_line(db):
    output, raw = create_key()
    assert output.count(raw) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--uses", "0"], "--uses"),
        (["--uses", "-3"], "--uses"),
        (["--expires-in", "0"], "--expires-in"),
        (["--uses", "many"], "invalid int value"),
        (["--expires-in", "soon"], "invalid int value"),
    ],
)
def test_the_command_refuses_bad_arguments(db, args, message):
    with pytest.raises(CommandError, match=message):
        create_key(*args)
    assert not EnrollmentKey.objects.exists()
