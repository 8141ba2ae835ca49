"""POST /api/v1/agents/: registration with an enrollment key or an operator's token."""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from agents import services
from agents.models import Agent, Capability, EnrollmentKey, IssuedToken, digest

URL = "/api/v1/agents/"


def register(body, *, key=None, token=None, client=None):
    client = client or APIClient()
    headers = {}
    if key is not None:
        headers["HTTP_X_ENROLLMENT_KEY"] = key
    if token is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client.post(URL, body, format="json", **headers)


def key_with(**fields) -> tuple[EnrollmentKey, str]:
    key, raw = services.enrollment_key_create(label="t", max_uses=fields.pop("max_uses", 5))
    if fields:
        EnrollmentKey.objects.filter(pk=key.pk).update(**fields)
    return key, raw


def assert_field_error(response, field):
    assert response.status_code == 400, response.content
    body = response.json()
    assert field in body["errors"], body
    assert field in body["detail"]


# --- The happy path -----------------------------------------------------------------------------


def test_it_registers_an_agent_with_an_enrollment_key(db, enrollment_key):
    body = {
        "agent_id": "scanner-1",
        "name": "Scanner",
        "description": "Reads documents.",
        "capabilities": [{"name": "ocr", "version": "2.1", "description": "Text from images."}],
        "metadata": {"region": "eu"},
    }
    response = register(body, key=enrollment_key)
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["agent_id"] == "scanner-1" and data["name"] == "Scanner"
    assert data["capabilities"] == [
        {"name": "ocr", "version": "2.1", "description": "Text from images."}
    ]
    assert data["metadata"] == {"region": "eu"}
    assert data["state"] == "active" and data["status"] == "offline"
    assert {"agent_secret", "access", "refresh", "created_at"} <= set(data)
    me = APIClient().get(f"{URL}me/", HTTP_AUTHORIZATION=f"Bearer {data['access']}")
    assert me.json()["agent_id"] == "scanner-1"


def test_it_stores_only_a_digest_of_the_secret(db, enrollment_key):
    data = register({"agent_id": "scanner-1"}, key=enrollment_key).json()
    agent = Agent.objects.get(agent_id="scanner-1")
    assert agent.secret_digest == digest(data["agent_secret"])
    assert data["agent_secret"] not in agent.secret_digest
    # The secret works, and is never shown again.
    obtain = APIClient().post(
        "/api/v1/auth/token/",
        {"agent_id": "scanner-1", "agent_secret": data["agent_secret"]},
        format="json",
    )
    assert obtain.status_code == 200
    profile = APIClient().get(f"{URL}me/", HTTP_AUTHORIZATION=f"Bearer {data['access']}").json()
    assert "agent_secret" not in profile and "secret_digest" not in profile


def test_it_records_the_tokens_it_issues_at_registration(db, enrollment_key):
    register({"agent_id": "scanner-1"}, key=enrollment_key)
    kinds = IssuedToken.objects.filter(agent__agent_id="scanner-1").values_list(
        "token_type", flat=True
    )
    assert sorted(kinds) == ["access", "refresh"]


def test_it_counts_a_use_of_the_key_and_links_the_agent_to_it(db):
    key, raw = key_with(max_uses=3)
    register({"agent_id": "scanner-1"}, key=raw)
    key.refresh_from_db()
    assert key.uses == 1
    assert Agent.objects.get(agent_id="scanner-1").enrolled_with == key


def test_an_operator_token_registers_without_a_key(operator_tokens):
    response = register({"agent_id": "ops-made"}, token=operator_tokens["access"])
    assert response.status_code == 201
    assert Agent.objects.get(agent_id="ops-made").enrolled_with is None


def test_an_operator_token_registers_without_spending_a_key_it_also_sends(operator_tokens):
    key, raw = key_with(max_uses=1)
    response = register({"agent_id": "ops-made"}, key=raw, token=operator_tokens["access"])
    assert response.status_code == 201
    key.refresh_from_db()
    assert key.uses == 0


def staff_token(django_user_model, *perms) -> str:
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=perms))
    return services.operator_tokens_issue(user=user)["access"]


def test_a_staff_token_without_add_agent_cannot_register(django_user_model):
    response = register(
        {"agent_id": "ops-made"}, token=staff_token(django_user_model, "view_agent")
    )
    assert response.status_code == 403
    assert "add_agent" in response.json()["detail"]
    assert not Agent.objects.exists()


def test_a_staff_token_with_add_agent_registers(django_user_model):
    response = register({"agent_id": "ops-made"}, token=staff_token(django_user_model, "add_agent"))
    assert response.status_code == 201


def test_a_staff_token_without_add_agent_may_still_use_a_key(django_user_model):
    _, raw = key_with(max_uses=1)
    token = staff_token(django_user_model)
    assert register({"agent_id": "keyed"}, key=raw, token=token).status_code == 201


# --- Keys refused -------------------------------------------------------------------------------


def test_it_answers_401_without_a_key(db):
    response = register({"agent_id": "scanner-1"})
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"
    assert "WWW-Authenticate" in response
    assert not Agent.objects.exists()


def test_it_answers_401_for_an_unknown_key(db):
    response = register({"agent_id": "scanner-1"}, key="ek_not-a-key")
    assert response.status_code == 401
    assert response.json()["code"] == "enrollment_key_invalid"
    assert not Agent.objects.exists()


def test_it_answers_401_for_an_empty_key(db):
    assert register({"agent_id": "scanner-1"}, key="").status_code == 401


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"max_uses": 2, "uses": 2}, "enrollment_key_spent"),
        ({"expires_at": timezone.now() - timedelta(seconds=1)}, "enrollment_key_expired"),
        ({"revoked_at": timezone.now()}, "enrollment_key_revoked"),
    ],
)
def test_it_answers_403_for_a_key_that_is_no_longer_usable(db, fields, code):
    _, raw = key_with(**fields)
    response = register({"agent_id": "scanner-1"}, key=raw)
    assert response.status_code == 403
    assert response.json()["code"] == code
    assert not Agent.objects.exists()


def test_it_spends_the_last_use_then_refuses(db):
    _, raw = key_with(max_uses=1)
    assert register({"agent_id": "first"}, key=raw).status_code == 201
    assert register({"agent_id": "second"}, key=raw).status_code == 403


def test_a_refused_registration_does_not_spend_a_use(db, alice):
    key, raw = key_with(max_uses=1)
    assert register({"agent_id": "alice"}, key=raw).status_code == 409
    assert register({"agent_id": "Bad Id"}, key=raw).status_code == 400
    key.refresh_from_db()
    assert key.uses == 0
    assert register({"agent_id": "scanner-1"}, key=raw).status_code == 201


def test_a_bad_key_does_not_reveal_which_agent_ids_exist(alice):
    assert register({"agent_id": "alice"}, key="ek_wrong").status_code == 401


def test_an_agent_token_cannot_register_other_agents(alice):
    response = register({"agent_id": "sock-puppet"}, token=alice.access)
    assert response.status_code == 403
    assert isinstance(response.json()["detail"], str)
    assert not Agent.objects.filter(agent_id="sock-puppet").exists()


def test_an_invalid_token_with_a_valid_key_is_refused(db, enrollment_key):
    response = register({"agent_id": "scanner-1"}, key=enrollment_key, token="not-a-token")
    assert response.status_code == 401


@pytest.mark.django_db(transaction=True)
def test_only_one_of_two_registrations_racing_for_the_last_use_wins():
    key, raw = key_with(max_uses=1)
    barrier = threading.Barrier(2)
    statuses = {}

    def worker(agent_id):
        try:
            barrier.wait()
            statuses[agent_id] = register({"agent_id": agent_id}, key=raw).status_code
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("racer-a", "racer-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(statuses.values()) == [201, 403]
    key.refresh_from_db()
    assert key.uses == 1
    assert Agent.objects.filter(agent_id__startswith="racer-").count() == 1


@pytest.mark.django_db(transaction=True)
def test_only_one_of_two_registrations_racing_for_one_agent_id_wins():
    key, raw = key_with(max_uses=10)
    barrier = threading.Barrier(2)
    statuses = []

    def worker():
        try:
            barrier.wait()
            statuses.append(register({"agent_id": "contested"}, key=raw).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(statuses) == [201, 409]
    key.refresh_from_db()
    assert key.uses == 1


# --- agent_id rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "agent_id",
    ["", "Alice", "-lead", ".lead", "_lead", "a b", "a/b", "ä", "a" * 65, "a\x00", None, ["a"]],
)
def test_it_refuses_agent_ids_outside_the_pattern(db, enrollment_key, agent_id):
    assert_field_error(register({"agent_id": agent_id}, key=enrollment_key), "agent_id")


def test_it_requires_an_agent_id(db, enrollment_key):
    assert_field_error(register({"name": "anonymous"}, key=enrollment_key), "agent_id")


@pytest.mark.parametrize("agent_id", ["a", "0", "a" * 64, "svc.eu-1_x", "9lives"])
def test_it_accepts_agent_ids_inside_the_pattern(db, enrollment_key, agent_id):
    response = register({"agent_id": agent_id}, key=enrollment_key)
    assert response.status_code == 201 and response.json()["agent_id"] == agent_id


def test_it_reserves_me(db, enrollment_key):
    response = register({"agent_id": "me"}, key=enrollment_key)
    assert response.status_code == 409
    assert "reserved" in response.json()["detail"]


def test_it_answers_409_for_a_taken_agent_id(alice, enrollment_key):
    response = register({"agent_id": "alice"}, key=enrollment_key)
    assert response.status_code == 409
    assert response.json()["code"] == "agent_id_taken"
    # The original owner is untouched.
    assert Agent.objects.get(agent_id="alice").check_secret(alice.secret)


def test_a_deregistered_agent_keeps_its_agent_id(alice, enrollment_key):
    services.agent_deregister(agent=alice.agent)
    assert register({"agent_id": "alice"}, key=enrollment_key).status_code == 409


# --- Capabilities and the other fields ----------------------------------------------------------


@pytest.mark.parametrize(
    "capabilities",
    [
        [{"name": "ocr"}, {"name": "ocr", "version": "2"}],
        [{"name": "has space"}],
        [{"name": "-dash-first"}],
        [{"name": ""}],
        [{"name": "x" * 101}],
        [{"version": "1"}],
        [{"name": "ocr", "version": "v" * 51}],
        ["ocr"],
        [None],
        {"name": "ocr"},
        "ocr",
        [{"name": f"cap-{n}"} for n in range(101)],
    ],
)
def test_it_refuses_invalid_capabilities(db, enrollment_key, capabilities):
    response = register({"agent_id": "scanner-1", "capabilities": capabilities}, key=enrollment_key)
    assert_field_error(response, "capabilities")
    assert not Agent.objects.exists()


def test_it_accepts_a_hundred_capabilities(db, enrollment_key, django_assert_max_num_queries):
    capabilities = [{"name": f"cap-{n}"} for n in range(100)]
    # Stored in one insert, not one per capability.
    with django_assert_max_num_queries(20):
        response = register(
            {"agent_id": "scanner-1", "capabilities": capabilities}, key=enrollment_key
        )
    assert response.status_code == 201
    assert Capability.objects.filter(agent__agent_id="scanner-1").count() == 100


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"agent_id": "s", "metadata": ["not", "an", "object"]}, "metadata"),
        ({"agent_id": "s", "metadata": "text"}, "metadata"),
        ({"agent_id": "s", "name": "n" * 201}, "name"),
        ({"agent_id": "s", "name": {"first": "n"}}, "name"),
        ({"agent_id": "s", "description": "d" * 5001}, "description"),
    ],
)
def test_it_names_the_field_that_is_invalid(db, enrollment_key, body, field):
    assert_field_error(register(body, key=enrollment_key), field)


def test_it_refuses_a_body_that_is_not_an_object(db, enrollment_key):
    response = register(["agent_id", "x"], key=enrollment_key)
    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)


def test_it_refuses_a_body_that_is_not_json(db, enrollment_key):
    response = APIClient().post(
        URL, "{nope", content_type="application/json", HTTP_X_ENROLLMENT_KEY=enrollment_key
    )
    assert response.status_code == 400
    assert response.json()["code"] == "parse_error"
