"""The audit log records who did what to what, when and from where; operators only read it.

Covered here: registrations (by key, by operator, refused), token issue, refresh and refusals
(agents and operators), enrollment keys (made and revoked), operator actions (enable, disconnect,
token revoke, context deletion, policy changes) and the hub's own sweeps. Refusals by policy are
in test_refusals.py; disable, deregister, revoke-all and rotate in agents/tests/test_admin.py;
dead-letter redelivery and purge in messaging/tests/test_admin.py.
"""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from agents import services as agent_services
from agents.models import Agent, Connection, EnrollmentKey, IssuedToken
from contexts import services as context_services
from contexts.models import ContextEntry
from security.models import AccessPolicy, AuditEvent, PolicySettings

pytestmark = pytest.mark.django_db

AGENTS = "/api/v1/agents/"
TOKEN = "/api/v1/auth/token/"
REFRESH = "/api/v1/auth/token/refresh/"


def events(action: str):
    return list(AuditEvent.objects.filter(action=action).order_by("at"))


def only(action: str) -> AuditEvent:
    (event,) = events(action)
    return event


def run_action(client, model, action, objects):
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    data = {"action": action, "_selected_action": [obj.pk for obj in objects]}
    return client.post(url, data, follow=True)


# --- Registration and tokens ---------------------------------------------------------------------


def test_a_registration_with_a_key_names_the_key_prefix_and_the_address(api, enrollment_key):
    response = api.post(
        AGENTS, {"agent_id": "newbie"}, format="json", HTTP_X_ENROLLMENT_KEY=enrollment_key
    )
    assert response.status_code == 201
    event = only("agent_registered")
    prefix = enrollment_key[:11]
    assert (event.actor_type, event.actor, event.target) == (
        "anonymous",
        f"enrollment key {prefix}",
        "newbie",
    )
    assert event.detail == {"enrollment_key": prefix} and event.source == "127.0.0.1"


def test_a_registration_by_an_operator_names_the_operator(api, operator_tokens):
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}")
    assert api.post(AGENTS, {"agent_id": "placed"}, format="json").status_code == 201
    event = only("agent_registered")
    assert (event.actor_type, event.actor, event.target) == ("operator", "operator", "placed")


def test_a_refused_registration_is_audited(api):
    _, raw = agent_services.enrollment_key_create(max_uses=1)
    for agent_id in ("first", "second"):
        api.post(AGENTS, {"agent_id": agent_id}, format="json", HTTP_X_ENROLLMENT_KEY=raw)
    event = only("agent_registration_refused")
    assert (event.target, event.outcome, event.detail) == (
        "second",
        "refused",
        {"code": "enrollment_key_spent"},
    )


def test_token_issue_refresh_and_refusals_are_audited_with_the_address(api, alice):
    pair = api.post(
        TOKEN, {"agent_id": "alice", "agent_secret": alice.secret}, format="json"
    ).json()
    api.post(TOKEN, {"agent_id": "alice", "agent_secret": "wrong"}, format="json")
    api.post(REFRESH, {"refresh": pair["refresh"]}, format="json")
    reused = api.post(REFRESH, {"refresh": pair["refresh"]}, format="json")
    assert reused.status_code == 401

    issued = events("token_issued")[-1]
    assert (issued.actor, issued.target, issued.source) == ("alice", "alice", "127.0.0.1")
    # Token ids are shown as prefixes only.
    assert set(issued.detail) == {"access_jti", "refresh_jti"}
    assert all(len(value) == 8 for value in issued.detail.values())
    refused = only("token_refused")
    assert (refused.actor, refused.outcome, refused.source) == ("alice", "refused", "127.0.0.1")
    assert only("token_refreshed").actor == "alice"
    replay = only("token_refresh_refused")
    assert (replay.actor, replay.target, replay.outcome) == ("alice", "alice", "refused")


def test_a_token_request_by_a_disabled_agent_is_refused_and_audited(api, alice):
    agent_services.agent_disable(agent=alice.agent)
    response = api.post(TOKEN, {"agent_id": "alice", "agent_secret": alice.secret}, format="json")
    assert response.status_code == 401
    assert only("token_refused").detail == {"code": "agent_disabled"}


def test_a_forged_refresh_token_is_audited_as_anonymous(api):
    assert api.post(REFRESH, {"refresh": "not.a.token"}, format="json").status_code == 401
    event = only("token_refresh_refused")
    assert (event.actor_type, event.actor, event.outcome) == ("anonymous", "anonymous", "refused")


def test_operator_tokens_and_bad_operator_passwords_are_audited(api, operator):
    assert (
        api.post(
            TOKEN, {"username": "operator", "password": "op-password-1"}, format="json"
        ).status_code
        == 200
    )
    assert (
        api.post(TOKEN, {"username": "operator", "password": "guess"}, format="json").status_code
        == 401
    )
    issued = only("token_issued")
    assert (issued.actor_type, issued.actor) == ("operator", "operator")
    refused = only("token_refused")
    assert (refused.actor, refused.outcome, refused.detail["operator"]) == (
        "operator",
        "refused",
        True,
    )


# --- Enrollment keys ------------------------------------------------------------------------------


def test_a_key_made_in_the_admin_is_audited_as_the_operator(operator_client):
    operator_client.post(reverse("admin:agents_enrollmentkey_add"), {"label": "batch-7"})
    key = EnrollmentKey.objects.get()
    event = only("enrollment_key_created")
    assert (event.actor_type, event.actor, event.target) == ("operator", "operator", key.prefix)
    assert event.detail["label"] == "batch-7" and event.source == "127.0.0.1"


def test_a_key_made_on_the_command_line_is_audited_as_the_system(capsys):
    call_command("create_enrollment_key", "--uses", "3")
    raw = capsys.readouterr().out.strip().splitlines()[-1]
    event = only("enrollment_key_created")
    assert (event.actor_type, event.target, event.detail["max_uses"]) == ("system", raw[:11], 3)
    assert raw not in repr(event.detail)


def test_revoking_a_key_in_the_admin_is_audited(operator_client):
    key, _ = agent_services.enrollment_key_create(label="old")
    run_action(operator_client, EnrollmentKey, "revoke", [key])
    event = only("enrollment_key_revoked")
    assert (event.actor, event.target) == ("operator", key.prefix)


# --- Operator actions -----------------------------------------------------------------------------


def test_enabling_an_agent_is_audited(operator_client, alice):
    agent_services.agent_disable(agent=alice.agent)
    run_action(operator_client, Agent, "enable", [alice.agent])
    event = only("agent_enabled")
    assert (event.actor, event.target) == ("operator", "alice")


def test_disconnecting_a_socket_names_the_operator(operator_client, alice):
    connection = agent_services.connection_open(agent=alice.agent, channel_name="x!1", server="s")
    run_action(operator_client, Connection, "disconnect", [connection])
    event = only("connections_closed")
    assert (event.actor_type, event.actor, event.detail) == ("operator", "operator", {"code": 1000})


def test_revoking_one_token_in_the_admin_is_audited_by_its_id_prefix(operator_client, alice):
    token = IssuedToken.objects.filter(agent=alice.agent, token_type="access").get()
    run_action(operator_client, IssuedToken, "revoke", [token])
    event = only("token_revoked")
    assert (event.actor, event.target) == ("operator", f"access {token.jti[:8]}")
    assert alice.access not in event.target


def test_an_operator_deleting_a_context_over_rest_or_in_the_admin_is_audited(
    alice, api, operator_tokens, operator_client
):
    first, _ = context_services.context_create(owner=alice.agent, context_type="error", payload={})
    second, _ = context_services.context_create(owner=alice.agent, context_type="error", payload={})
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}")
    assert api.delete(f"/api/v1/contexts/{first.pk}/").status_code == 204
    rest = only("context_deleted")
    assert (rest.actor, rest.target, rest.detail["owner"]) == ("operator", str(first.pk), "alice")
    operator_client.post(
        reverse("admin:contexts_contextentry_changelist"),
        {"action": "delete_selected", "_selected_action": [second.pk], "post": "yes"},
    )
    admin = only("contexts_deleted")
    assert (admin.actor, admin.target) == ("operator", str(second.pk))
    assert not ContextEntry.objects.exists()


def test_policy_changes_in_the_admin_are_audited(operator_client):
    add = reverse("admin:security_accesspolicy_add")
    operator_client.post(
        add,
        {
            "name": "quiet",
            "enabled": "on",
            "effect": "deny",
            "subject_kind": "all",
            "subject": "",
            "action": "publish",
            "target": "noise.*",
            "priority": "0",
        },
    )
    policy = AccessPolicy.objects.get()
    change = reverse("admin:security_accesspolicy_change", args=[policy.pk])
    operator_client.post(
        change,
        {
            "name": "quiet",
            "effect": "deny",
            "subject_kind": "all",
            "subject": "",
            "action": "publish",
            "target": "noise.*",
            "priority": "5",
        },
    )
    operator_client.post(
        reverse("admin:security_accesspolicy_delete", args=[policy.pk]), {"post": "yes"}
    )
    operator_client.post(reverse("admin:security_policysettings_add"), {"default_effect": "deny"})
    (created, switched), changed = events("policy_created"), only("policy_changed")
    deleted = only("policy_deleted")
    assert {created.actor, switched.actor, changed.actor, deleted.actor} == {"operator"}
    assert created.target == deleted.target == "deny every agent publish noise.*"
    assert set(changed.detail["fields"]) == {"enabled", "priority"}
    assert switched.target == "default: deny" and created.source == "127.0.0.1"
    assert not AccessPolicy.objects.exists()
    assert PolicySettings.objects.get().default_effect == "deny"


def test_the_liveness_sweep_is_audited_as_the_system(alice, settings):
    connection = agent_services.connection_open(agent=alice.agent, channel_name="y!1", server="s")
    stale = timezone.now() - timedelta(seconds=settings.HUB["HEARTBEAT_INTERVAL"] * 10)
    Connection.objects.filter(pk=connection.pk).update(last_seen_at=stale)
    assert agent_services.connections_sweep() == 1
    event = only("connections_swept")
    assert (event.actor_type, event.detail["sessions"]) == ("system", [str(connection.session_id)])


# --- The audit log is read-only -------------------------------------------------------------------


def test_operators_can_read_the_audit_log_but_never_change_it(operator_client, alice):
    agent_services.agent_disable(agent=alice.agent, actor=None)
    event = AuditEvent.objects.get(action="agent_disabled")
    listing = operator_client.get(reverse("admin:security_auditevent_changelist"))
    assert listing.status_code == 200 and "agent_disabled" in listing.content.decode()
    assert operator_client.get(reverse("admin:security_auditevent_add")).status_code == 403
    change = reverse("admin:security_auditevent_change", args=[event.pk])
    page = operator_client.get(change)
    assert page.status_code == 200 and 'name="actor"' not in page.content.decode()
    operator_client.post(change, {"actor": "someone-else", "action": "nothing"})
    delete = reverse("admin:security_auditevent_delete", args=[event.pk])
    assert operator_client.post(delete, {"post": "yes"}).status_code == 403
    event.refresh_from_db()
    assert (event.actor, event.action) == ("alice", "agent_disabled")
