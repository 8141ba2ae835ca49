"""The OpenAPI document: valid, complete, and true to what the server answers."""

import collections

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

pytestmark = pytest.mark.django_db


@pytest.fixture
def openapi():
    return SchemaGenerator().get_schema(request=None, public=True)


def test_the_schema_is_valid_openapi_3(openapi):
    validate_schema(openapi)
    assert openapi["openapi"].startswith("3.")
    assert openapi["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_every_operation_documents_its_errors_with_the_error_body(openapi):
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"400", "401", "429"} <= set(responses), (method, path)
            assert any(code.startswith("2") for code in responses), (method, path)
            if "{" in path:
                assert "404" in responses, (method, path)
            error = responses["401"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/Error"}, (method, path)


def test_schema_and_swagger_ui_are_served(client):
    schema = client.get("/api/v1/schema/")
    assert schema.status_code == 200
    assert b"/api/v1/messages/" in schema.content
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 200
    assert b"swagger-ui" in docs.content


@pytest.fixture
def api_schema(db):
    # The requests run inside the test's transaction, as Django's test client runs them: the
    # per-request connection cleanup would otherwise close the connection that holds it.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield schemathesis.openapi.from_wsgi("/api/v1/schema/?format=json", get_wsgi_application())
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def peer(make_agent):
    return make_agent("peer", capabilities=["ocr"])


# Generated cases per operation: enough to hit every documented body and parameter shape
# while the whole run stays under a minute.
EXAMPLES_PER_OPERATION = 20


def fuzz(operation, *, auth: dict, enrollment_key: str) -> collections.Counter:
    """Call one operation with generated cases; return the status classes it answered."""
    seen = collections.Counter()

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def exercise(case):
        if case.headers and "X-Enrollment-Key" in case.headers:
            # A random key is refused at once; a valid one lets the body be explored.
            case.headers["X-Enrollment-Key"] = enrollment_key
        # Every check but positive_data_acceptance: DRF rightly refuses some schema-valid
        # bodies, for rules JSON Schema cannot state (NUL characters, "both or neither" field
        # pairs, "exactly one of to/topic/broadcast"), with 400 naming the failing field.
        response = case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance])
        seen[response.status_code // 100 * 100] += 1

    exercise()
    return seen


def test_the_api_never_answers_a_server_error_and_matches_its_schema(
    api_schema, make_agent, enrollment_key, peer
):
    failures = {}
    statuses = {}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 14

    for number, operation in enumerate(operations):
        name = f"{operation.method.upper()} {operation.path}"
        # A fresh agent per operation: one that DELETE agents/me/ deregistered explores nothing.
        auth = {"Authorization": f"Bearer {make_agent(f'fuzzer-{number}').access}"}
        try:
            statuses[name] = fuzz(operation, auth=auth, enrollment_key=enrollment_key)
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis groups its check failures
            failures[name] = str(exc)[:2000]

    assert not failures, f"failing operations: {sorted(failures)}\n\n" + "\n\n".join(
        f"{name}:\n{error}" for name, error in failures.items()
    )
    # Not a vacuous run: most operations got past authentication and validation to a success.
    succeeded = [name for name, seen in statuses.items() if seen[200]]
    assert len(succeeded) >= len(operations) // 2, statuses
