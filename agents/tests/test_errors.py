"""Every REST error answers JSON: a human-readable message, a code, and any field at fault."""

import json

import pytest
from django.test import AsyncClient
from rest_framework.test import APIClient

ME = "/api/v1/agents/me/"
LIMIT = 4096


def assert_json_error(response, status, code=None):
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["detail"], str) and len(body["detail"]) > 5
    assert isinstance(body["code"], str)
    if code:
        assert body["code"] == code
    return body


@pytest.fixture
def small_body_limit(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = LIMIT


# --- 401 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/v1/agents/", "/api/v1/agents/alice/", ME, "/api/v1/agents/me/heartbeat/"]
)
def test_it_answers_401_json_without_credentials(db, path):
    client = APIClient()
    response = client.post(path) if path.endswith("heartbeat/") else client.get(path)
    assert_json_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


@pytest.mark.parametrize("header", ["Basic YWxpY2U6c2VjcmV0", "Token abc", "bearer"])
def test_it_answers_401_json_for_other_schemes_and_empty_bearers(db, header):
    response = APIClient().get(ME, HTTP_AUTHORIZATION=header)
    assert_json_error(response, 401)
    assert "WWW-Authenticate" in response


def test_it_answers_401_json_for_an_invalid_token(db):
    response = APIClient().get(ME, HTTP_AUTHORIZATION="Bearer abc.def.ghi")
    body = assert_json_error(response, 401, "token_not_valid")
    assert "token" in body["detail"].lower()


def test_it_answers_401_json_for_bad_agent_credentials(alice):
    response = APIClient().post(
        "/api/v1/auth/token/", {"agent_id": "alice", "agent_secret": "x"}, format="json"
    )
    assert_json_error(response, 401, "invalid_credentials")
    assert "WWW-Authenticate" in response


# --- 403 ----------------------------------------------------------------------------------------


def test_it_answers_403_json_when_an_operator_calls_an_agent_only_endpoint(operator_tokens):
    response = APIClient().get(ME, HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}")
    body = assert_json_error(response, 403, "permission_denied")
    assert body["detail"] == "This call is for agents."


# --- 400 naming the field -----------------------------------------------------------------------


def test_it_names_each_invalid_field(as_agent, alice):
    response = as_agent(alice).patch(
        ME,
        {"name": "n" * 201, "metadata": [], "capabilities": [{"name": "bad name"}]},
        format="json",
    )
    body = assert_json_error(response, 400, "invalid")
    assert set(body["errors"]) == {"name", "metadata", "capabilities"}
    for field in ("name", "metadata", "capabilities"):
        assert field in body["detail"]
    assert all(isinstance(message, str) for message in body["errors"]["name"])


def test_it_names_the_field_inside_a_capability(as_agent, alice):
    response = as_agent(alice).patch(ME, {"capabilities": [{"version": "1"}]}, format="json")
    body = assert_json_error(response, 400)
    items = body["errors"]["capabilities"]
    # DRF keys per-item errors by position.
    first = items["0"] if isinstance(items, dict) else items[0]
    assert first == {"name": ["This field is required."]}


def test_it_answers_400_json_for_malformed_json(as_agent, alice):
    response = as_agent(alice).patch(ME, '{"name": ', content_type="application/json")
    assert_json_error(response, 400, "parse_error")


def test_it_answers_400_naming_the_query_parameter(as_agent, alice):
    body = assert_json_error(as_agent(alice).get("/api/v1/agents/?status=maybe"), 400)
    assert "status" in body["errors"] and "status" in body["detail"]


@pytest.mark.parametrize(
    ("body", "field", "where"),
    [
        ('{"metadata": {"a": "x\\u0000y"}}', "metadata", "metadata.a"),
        ('{"metadata": {"k\\u0000": 1}}', "metadata", "metadata.k\u0000"),
        ('{"metadata": {"list": [1, ["\\u0000"]]}}', "metadata", "metadata.list.1.0"),
        ('{"name": "\\u0000"}', "name", "name"),
    ],
)
def test_it_refuses_nul_characters_naming_the_field(as_agent, alice, body, field, where):
    # PostgreSQL cannot store NUL in text or JSON; every backend refuses it the same way.
    response = as_agent(alice).patch(ME, body, content_type="application/json")
    errors = assert_json_error(response, 400, "invalid")["errors"]
    assert list(errors) == [field]
    assert f"(at {where})" in errors[field][0]


def test_it_accepts_an_escaped_backslash_before_u0000(as_agent, alice):
    body = '{"metadata": {"path": "C:\\\\u0000"}}'
    response = as_agent(alice).patch(ME, body, content_type="application/json")
    assert response.status_code == 200
    assert response.json()["metadata"] == {"path": "C:\\u0000"}


@pytest.mark.parametrize(
    "body",
    [
        '{"metadata": {"deep": ' + "[" * 5000 + "]" * 5000 + "}}",
        '{"name": "\\ud800"}',
        '{"name": NaN}',
        '{"name": "a", "name": ',
    ],
)
def test_it_answers_400_for_json_it_cannot_store_or_parse_safely(as_agent, alice, body):
    response = as_agent(alice).patch(ME, body, content_type="application/json")
    assert_json_error(response, 400, "parse_error")


def test_it_parses_a_body_in_another_text_charset(as_agent, alice):
    body = '{"name": "Alicé"}'.encode("latin-1")
    response = as_agent(alice).patch(ME, body, content_type="application/json; charset=latin-1")
    assert response.status_code == 200 and response.json()["name"] == "Alicé"


def test_it_refuses_a_charset_that_is_not_a_text_encoding(as_agent, alice):
    response = as_agent(alice).patch(
        ME, b"BZh9...", content_type="application/json; charset=bz2_codec"
    )
    assert_json_error(response, 400, "parse_error")


# --- 404, 405, 415 ------------------------------------------------------------------------------


def test_it_answers_404_json_for_an_unknown_agent(as_agent, alice):
    body = assert_json_error(as_agent(alice).get("/api/v1/agents/ghost/"), 404, "not_found")
    assert "Agent" in body["detail"]


def test_it_answers_405_json_for_a_method_it_does_not_allow(as_agent, alice):
    assert_json_error(as_agent(alice).put(ME, {}, format="json"), 405, "method_not_allowed")


def test_it_answers_415_json_for_a_body_that_is_not_json(as_agent, alice):
    response = as_agent(alice).patch(ME, "name=x", content_type="application/x-www-form-urlencoded")
    assert_json_error(response, 415, "unsupported_media_type")


# --- 413 ----------------------------------------------------------------------------------------


def test_it_answers_413_json_for_a_body_over_the_limit(as_agent, alice, small_body_limit):
    body = {"metadata": {"blob": "x" * LIMIT}}
    response = as_agent(alice).patch(ME, body, format="json")
    assert_json_error(response, 413, "payload_too_large")
    alice.agent.refresh_from_db()
    assert alice.agent.metadata == {}


def test_it_accepts_a_body_just_under_the_limit(as_agent, alice, small_body_limit):
    blob = "x" * (LIMIT - 100)
    response = as_agent(alice).patch(ME, {"metadata": {"blob": blob}}, format="json")
    assert response.status_code == 200
    assert len(json.dumps({"metadata": {"blob": blob}})) < LIMIT


def test_it_answers_413_before_authenticating_a_registration(db, small_body_limit):
    response = APIClient().post(
        "/api/v1/agents/",
        {"agent_id": "big", "metadata": {"blob": "x" * LIMIT}},
        format="json",
        HTTP_X_ENROLLMENT_KEY="ek_whatever",
    )
    assert_json_error(response, 413, "payload_too_large")


@pytest.mark.django_db(transaction=True)
async def test_it_answers_413_json_through_the_asgi_handler(small_body_limit):
    # Production serves through ASGI, whose request reads its body differently from WSGI's.
    response = await AsyncClient().post(
        "/api/v1/auth/token/",
        json.dumps({"agent_id": "a", "agent_secret": "s" * LIMIT}),
        content_type="application/json",
    )
    assert_json_error(response, 413, "payload_too_large")


@pytest.mark.parametrize("path", ["/api/v1/nope/", "/api/v1/agents/alice/extra/", "/api/v1/x"])
def test_it_answers_404_json_for_a_path_no_endpoint_matches(as_agent, alice, path):
    body = assert_json_error(as_agent(alice).get(path), 404, "not_found")
    assert path in body["detail"] and "Did you mean" not in body["detail"]


def test_it_points_a_post_without_its_trailing_slash_to_the_right_path(db):
    response = APIClient().post("/api/v1/agents", {"agent_id": "x"}, format="json")
    body = assert_json_error(response, 404, "not_found")
    assert "Did you mean /api/v1/agents/ ?" in body["detail"]


def test_the_schema_still_lists_every_endpoint(db):
    response = APIClient().get("/api/v1/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/api/v1/agents/" in paths and "/api/v1/agents/me/heartbeat/" in paths
