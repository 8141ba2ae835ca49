"""Every REST endpoint x every method x every kind of caller: no one reads or writes across agents.

The endpoints are read from the URLconf, not listed by hand, so a new endpoint joins the matrix by
itself, and fails it until EXPECTED says what each caller should get from it. Callers:

- owner: the agent whose resources the URL names (its agent_id, a message it sent, its contexts);
- other: another agent, which may read shared contexts (unless a policy denies the type) and
  nothing else of the owner's;
- anonymous: no credentials; only the public endpoints answer anything but 401;
- operator: a superuser's token, so every model permission;
- staff: a staff user's token without any model permission: only what needs none.

Besides the exact status of every cell, each request is checked for invariants that hold whatever
the endpoint: nobody but the owner and the operator changes the owner's data; no response carries
the owner's secret or tokens; callers who may not read the owner's messages or private contexts
never see a byte of them; every `forbidden` answer to an agent is in the audit log.
"""

import json
import re
from dataclasses import dataclass

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.test import APIClient

from agents import services as agent_services
from agents.models import Agent, IssuedToken
from contexts import services as context_services
from contexts.models import ContextEntry
from messaging import services as messaging_services
from messaging.models import Delivery, Message, Subscription
from security.models import AccessPolicy, AuditEvent
from security.services import policies

API_PREFIX = "api/v1/"
PRINCIPALS = ("owner", "other", "anonymous", "operator", "staff")
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
# Function views answer any method; these stand for all of them.
FUNCTION_VIEW_METHODS = ("GET", "POST", "DELETE")

MESSAGE_MARKER = "owner-to-third-7f3a"  # in a message the owner sent to the third agent
INBOX_MARKER = "third-to-owner-91c2"  # in a message the third agent sent to the owner
PRIVATE_MARKER = "private-error-5be8"  # in the owner's context of a type `other` may not read
SHARED_MARKER = "shared-result-0d44"  # in the owner's context every agent may read

# --- The endpoints, from the URLconf --------------------------------------------------------------


def _walk(patterns, prefix=""):
    for entry in patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            yield from _walk(entry.url_patterns, route)
        elif isinstance(entry, URLPattern):
            yield route, entry.callback


def _methods(callback) -> tuple[str, ...]:
    view_class = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
    if view_class is None:
        return FUNCTION_VIEW_METHODS
    return tuple(
        method.upper()
        for method in view_class.http_method_names
        if method not in ("options", "head") and hasattr(view_class, method)
    )


def api_endpoints() -> list[tuple[str, str]]:
    """Return (route, method) for every endpoint under /api/v1/, in URLconf order."""
    found = []
    for route, callback in _walk(get_resolver().url_patterns):
        if route.startswith(API_PREFIX):
            found.extend((route.removeprefix(API_PREFIX), method) for method in _methods(callback))
    return found


ENDPOINTS = api_endpoints()

# --- What each caller should get ------------------------------------------------------------------

# Public endpoints: anonymous callers get an answer on the merits, not 401.
PUBLIC = {
    ("agents/", "POST"),  # registration with an enrollment key
    ("auth/token/", "POST"),
    ("auth/token/refresh/", "POST"),
    ("schema/", "GET"),
    ("docs/", "GET"),
    ("^", "GET"),  # the JSON 404 for unknown paths
    ("^", "POST"),
    ("^", "DELETE"),
}


def row(owner, other, anonymous, operator, staff) -> dict[str, int]:
    return dict(zip(PRINCIPALS, (owner, other, anonymous, operator, staff), strict=True))


SHARED_READ = row(200, 200, 401, 200, 403)
PRIVATE_READ = row(200, 403, 401, 200, 403)
OWNER_WRITE = row(200, 403, 401, 403, 403)

# (route, method) -> variant -> principal -> status. A variant picks which of the owner's
# contexts a context_id in the route names: "shared" (any agent may read its type) or "private".
EXPECTED: dict[tuple[str, str], dict[str, dict[str, int]]] = {
    # Discovery is open to agents and to operators with agents.view_agent. Registering takes an
    # enrollment key (anonymous sends one) or an operator with agents.add_agent.
    ("agents/", "GET"): {"": row(200, 200, 401, 200, 403)},
    ("agents/", "POST"): {"": row(403, 403, 201, 201, 403)},
    # "me" is always the caller itself: the other agent changes only itself.
    ("agents/me/", "GET"): {"": row(200, 200, 401, 403, 403)},
    ("agents/me/", "PATCH"): {"": row(200, 200, 401, 403, 403)},
    ("agents/me/", "DELETE"): {"": row(204, 204, 401, 403, 403)},
    ("agents/me/heartbeat/", "POST"): {"": row(200, 200, 401, 403, 403)},
    ("agents/<str:agent_id>/", "GET"): {"": row(200, 200, 401, 200, 403)},
    # Every caller presents a wrong secret / a forged refresh token.
    ("auth/token/", "POST"): {"": row(401, 401, 401, 401, 401)},
    ("auth/token/refresh/", "POST"): {"": row(401, 401, 401, 401, 401)},
    # Messaging is for agents only; a message is readable by its sender and recipients.
    ("messages/", "POST"): {"": row(201, 201, 401, 403, 403)},
    ("messages/inbox/", "GET"): {"": row(200, 200, 401, 403, 403)},
    ("messages/ack/", "POST"): {"": row(200, 200, 401, 403, 403)},
    ("messages/<uuid:message_id>/", "GET"): {"": row(200, 404, 401, 403, 403)},
    # Contexts: shared between agents by design, each type under the access policies; only the
    # owner changes an entry; operators read and delete with the model permissions.
    ("contexts/", "GET"): {"": row(200, 200, 401, 200, 403)},
    ("contexts/", "POST"): {"": row(201, 201, 401, 403, 403)},
    ("contexts/<str:context_id>/", "GET"): {"shared": SHARED_READ, "private": PRIVATE_READ},
    ("contexts/<str:context_id>/", "PUT"): {"shared": OWNER_WRITE, "private": OWNER_WRITE},
    ("contexts/<str:context_id>/", "PATCH"): {"shared": OWNER_WRITE, "private": OWNER_WRITE},
    ("contexts/<str:context_id>/", "DELETE"): {
        "shared": row(204, 403, 401, 204, 403),
        "private": row(204, 403, 401, 204, 403),
    },
    ("contexts/<str:context_id>/versions/", "GET"): {
        "shared": SHARED_READ,
        "private": PRIVATE_READ,
    },
    ("contexts/<str:context_id>/versions/<int:version>/", "GET"): {
        "shared": SHARED_READ,
        "private": PRIVATE_READ,
    },
    ("schema/", "GET"): {"": row(200, 200, 200, 200, 200)},
    ("docs/", "GET"): {"": row(200, 200, 200, 200, 200)},
    ("^", "GET"): {"": row(404, 404, 404, 404, 404)},
    ("^", "POST"): {"": row(404, 404, 404, 404, 404)},
    ("^", "DELETE"): {"": row(404, 404, 404, 404, 404)},
}


def cells():
    """Every (route, method, variant, principal) of the discovered endpoints."""
    for route, method in ENDPOINTS:
        variants = EXPECTED.get((route, method)) or {"": None}
        for variant in variants:
            for principal in PRINCIPALS:
                yield pytest.param(
                    route,
                    method,
                    variant,
                    principal,
                    id=f"{method} {route}{f' [{variant}]' if variant else ''} as {principal}",
                )


CELLS = list(cells())


def test_every_api_endpoint_is_classified():
    """A new endpoint fails here until EXPECTED says what each caller should get from it."""
    unknown = sorted(set(ENDPOINTS) - set(EXPECTED))
    assert not unknown, f"classify these endpoints in security/tests/test_matrix.py: {unknown}"


def test_the_classification_names_only_existing_endpoints():
    stale = sorted(set(EXPECTED) - set(ENDPOINTS))
    assert not stale, f"these classified endpoints are gone from the URLconf: {stale}"


def test_the_matrix_covers_every_endpoint_and_caller():
    assert len(ENDPOINTS) >= 25
    assert len(CELLS) == sum(len(EXPECTED[e]) for e in ENDPOINTS) * len(PRINCIPALS)


# --- The world each cell runs in ------------------------------------------------------------------


@dataclass
class World:
    owner: object
    other: object
    third: object
    enrollment_key: str
    operator_access: str
    staff_access: str
    sent_message: Message
    received_message: Message
    shared_context: ContextEntry
    private_context: ContextEntry

    def token(self, principal: str) -> str | None:
        return {
            "owner": self.owner.access,
            "other": self.other.access,
            "anonymous": None,
            "operator": self.operator_access,
            "staff": self.staff_access,
        }[principal]

    def path_params(self, variant: str) -> dict[str, str]:
        context = self.private_context if variant == "private" else self.shared_context
        return {
            "agent_id": self.owner.agent_id,
            "message_id": str(self.sent_message.id),
            "context_id": str(context.id),
            "version": "1",
        }


@pytest.fixture
def world(make_agent, django_user_model, enrollment_key) -> World:
    owner = make_agent("owner", capabilities=["ocr"], name="Owner", metadata={"tier": "gold"})
    other = make_agent("other", capabilities=["ocr"])
    third = make_agent("third")
    # Contexts are shared, but an operator may keep a type from some agents.
    AccessPolicy.objects.create(
        name="other may not read errors",
        effect="deny",
        subject_kind="agent",
        subject="other",
        action="context_read",
        target="error",
    )
    policies.invalidate()
    sent = messaging_services.message_send(
        sender=owner.agent, kind="direct", to="third", payload={"note": MESSAGE_MARKER}
    )
    received = messaging_services.message_send(
        sender=third.agent, kind="direct", to="owner", payload={"note": INBOX_MARKER}
    )
    messaging_services.topic_subscribe(agent=owner.agent, topic="owner.news")
    shared, _ = context_services.context_create(
        owner=owner.agent, context_type="task_result", payload={"note": SHARED_MARKER}
    )
    private, _ = context_services.context_create(
        owner=owner.agent, context_type="error", payload={"note": PRIVATE_MARKER}
    )
    operator = django_user_model.objects.create_superuser("root", "", "root-password-1")
    staff = django_user_model.objects.create_user("staff", "", "staff-password-1", is_staff=True)
    return World(
        owner=owner,
        other=other,
        third=third,
        enrollment_key=enrollment_key,
        operator_access=agent_services.operator_tokens_issue(user=operator)["access"],
        staff_access=agent_services.operator_tokens_issue(user=staff)["access"],
        sent_message=Message.objects.get(pk=sent.message_id),
        received_message=Message.objects.get(pk=received.message_id),
        shared_context=shared,
        private_context=private,
    )


def owner_snapshot(agent_pk: int) -> dict:
    """Everything of the owner's that another caller must not be able to change."""
    agent = Agent.objects.get(pk=agent_pk)
    return {
        "profile": (agent.name, agent.description, agent.metadata, agent.state),
        "secret": agent.secret_digest,
        "capabilities": sorted(agent.capabilities.values_list("name", "version")),
        "tokens": sorted(IssuedToken.objects.filter(agent=agent).values_list("jti", "revoked_at")),
        "contexts": sorted(
            (str(pk), version, repr(payload), tuple(tags))
            for pk, version, payload, tags in ContextEntry.objects.filter(owner=agent).values_list(
                "pk", "version", "payload", "tags"
            )
        ),
        "deliveries": sorted(
            (str(message_id), status, attempts)
            for message_id, status, attempts in Delivery.objects.filter(
                recipient=agent
            ).values_list("message_id", "status", "attempts")
        ),
        "sent": Message.objects.filter(sender=agent).count(),
        "subscriptions": sorted(
            Subscription.objects.filter(agent=agent).values_list("topic", flat=True)
        ),
    }


PARAM = re.compile(r"<(?:\w+:)?(\w+)>")


def concrete_url(route: str, world: World, variant: str) -> str:
    if route == "^":
        return "/api/v1/no-such-endpoint/"
    params = world.path_params(variant)
    return "/" + API_PREFIX + PARAM.sub(lambda m: params[m.group(1)], route)


def request_for(route: str, method: str, principal: str, world: World) -> tuple[dict, dict]:
    """Return a plausible body and headers for the call, so the owner's cell really succeeds."""
    body, headers = None, {}
    match (route, method):
        case ("agents/", "POST"):
            body = {"agent_id": f"new-by-{principal}", "capabilities": []}
            if principal == "anonymous":
                headers["HTTP_X_ENROLLMENT_KEY"] = world.enrollment_key
        case ("agents/me/", "PATCH"):
            body = {"name": f"renamed by {principal}", "metadata": {"tier": "stolen"}}
        case ("auth/token/", "POST"):
            body = {"agent_id": world.owner.agent_id, "agent_secret": "not-the-secret"}
        case ("auth/token/refresh/", "POST"):
            # The owner's refresh token with its signature cut off: forged, never accepted.
            body = {"refresh": world.owner.refresh.rsplit(".", 1)[0] + ".forged"}
        case ("messages/", "POST"):
            body = {"to": world.third.agent_id, "payload": {"from": principal}}
        case ("messages/ack/", "POST"):
            # The id of a message addressed to the owner: only the owner may acknowledge it.
            body = {"message_ids": [str(world.received_message.id)]}
        case ("contexts/", "POST"):
            body = {"context_type": "task_result", "payload": {"by": principal}}
        case ("contexts/<str:context_id>/", "PUT"):
            body = {"payload": {"overwritten_by": principal}}
            headers["HTTP_IF_MATCH"] = '"1"'
        case ("contexts/<str:context_id>/", "PATCH"):
            body = {"payload": {"patched_by": principal}, "tags": ["defaced"]}
            headers["HTTP_IF_MATCH"] = '"1"'
        case (_, "POST"):
            body = {}
    return body, headers


def call(route, method, variant, principal, world):
    client = APIClient()
    token = world.token(principal)
    body, headers = request_for(route, method, principal, world)
    if token is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    url = concrete_url(route, world, variant)
    if body is None:
        return client.generic(method, url, **headers)
    return client.generic(
        method, url, data=json.dumps(body), content_type="application/json", **headers
    )


def error_code(response) -> str | None:
    if response.get("Content-Type", "").startswith("application/json") and response.content:
        body = response.json()
        if isinstance(body, dict):
            return body.get("code")
    return None


# --- The matrix -----------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("route", "method", "variant", "principal"), CELLS)
def test_matrix(route, method, variant, principal, world):
    expected = EXPECTED.get((route, method))
    assert expected is not None, f"{method} {route} is not classified (see EXPECTED)"
    before = owner_snapshot(world.owner.agent.pk)
    refusals_before = AuditEvent.objects.filter(outcome="refused").count()

    response = call(route, method, variant, principal, world)
    text = response.content.decode(errors="replace")
    status = response.status_code

    # 1. The exact answer for this caller.
    assert status == expected[variant][principal], (status, text[:300])

    # 2. Anonymous callers are told to authenticate, except at the public endpoints.
    if principal == "anonymous" and (route, method) not in PUBLIC:
        assert status == 401 and error_code(response) == "not_authenticated", text[:300]
        assert response["WWW-Authenticate"].startswith("Bearer")

    # 3. Only the owner itself and an operator with permission may change the owner's data.
    if principal in ("other", "anonymous", "staff"):
        assert owner_snapshot(world.owner.agent.pk) == before

    # 4. A write naming one of the owner's resources never succeeds for another caller.
    if method in WRITES and "<" in route and principal in ("other", "anonymous", "staff"):
        assert not 200 <= status < 300

    # 5. Secrets never leave the hub: not the owner's secret, nor its live tokens.
    for secret in (world.owner.secret, world.owner.access, world.owner.refresh):
        assert secret not in text
    assert "secret_digest" not in text and "key_digest" not in text

    # 6. Message bodies only for their sender and recipients; private contexts only for those
    #    the policies let read them.
    if principal != "owner":
        assert MESSAGE_MARKER not in text and INBOX_MARKER not in text
    if principal in ("other", "anonymous", "staff"):
        assert PRIVATE_MARKER not in text
    if principal in ("anonymous", "staff"):
        assert SHARED_MARKER not in text

    # 7. Every refusal of an agent by policy or ownership is in the audit log.
    if principal in ("owner", "other") and error_code(response) == "forbidden":
        refused = AuditEvent.objects.filter(outcome="refused", actor=principal)
        assert AuditEvent.objects.filter(outcome="refused").count() > refusals_before
        assert refused.exists()
