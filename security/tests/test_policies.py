import pytest

from agents.errors import Forbidden
from security.models import AccessPolicy, AuditEvent, PolicySettings
from security.services import access_allowed, access_check, policies, target_matches


@pytest.fixture(autouse=True)
def fresh_policy_cache():
    policies.invalidate()
    yield
    policies.invalidate()


def policy(**fields):
    rule = AccessPolicy.objects.create(name=fields.pop("name", "p"), **fields)
    policies.invalidate()
    return rule


@pytest.mark.parametrize(
    ("pattern", "target", "expected"),
    [
        ("*", "anything", True),
        ("alerts", "alerts", True),
        ("alerts", "alerts.x", False),
        ("alerts.*", "alerts", True),
        ("alerts.*", "alerts.fraud.high", True),
        ("alerts.*", "alertsx", False),
        ("alerts.*", "other", False),
    ],
)
def test_it_matches_exact_names_and_prefix_patterns(pattern, target, expected):
    assert target_matches(pattern, target) is expected


def test_it_allows_everything_by_default(alice):
    assert access_allowed(agent=alice.agent, action="send", target="bob")


def test_it_denies_everything_when_the_operator_switches_to_default_deny(alice):
    PolicySettings.objects.create(default_effect="deny")
    policies.invalidate()
    assert not access_allowed(agent=alice.agent, action="send", target="bob")


def test_an_allow_rule_opens_a_hole_in_default_deny(alice, bob):
    PolicySettings.objects.create(default_effect="deny")
    policy(subject_kind="agent", subject="alice", action="publish", target="alerts.*")
    assert access_allowed(agent=alice.agent, action="publish", target="alerts.fraud")
    assert not access_allowed(agent=alice.agent, action="publish", target="news")
    assert not access_allowed(agent=bob.agent, action="publish", target="alerts.fraud")


def test_rules_about_other_actions_leave_an_action_to_the_default(alice):
    policy(effect="deny", action="publish", target="*")
    assert access_allowed(agent=alice.agent, action="send", target="bob")
    assert not access_allowed(agent=alice.agent, action="publish", target="news")
    policy(name="q", effect="deny", action="send", target="bob")  # read again at once
    assert not access_allowed(agent=alice.agent, action="send", target="bob")


def test_deny_wins_over_allow_at_equal_priority(alice):
    policy(effect="allow", action="send", target="*")
    policy(effect="deny", action="send", target="bob")
    assert not access_allowed(agent=alice.agent, action="send", target="bob")
    assert access_allowed(agent=alice.agent, action="send", target="carol")


def test_a_higher_priority_allow_overrides_a_lower_deny(alice):
    policy(effect="deny", action="send", target="*", priority=0)
    policy(
        effect="allow",
        subject_kind="agent",
        subject="alice",
        action="send",
        target="bob",
        priority=10,
    )
    assert access_allowed(agent=alice.agent, action="send", target="bob")
    assert not access_allowed(agent=alice.agent, action="send", target="carol")


def test_it_matches_subjects_by_capability(alice, bob):
    policy(
        effect="deny",
        subject_kind="capability",
        subject="ocr",
        action="context_write",
        target="error",
    )
    assert not access_allowed(agent=alice.agent, action="context_write", target="error")  # has ocr
    assert access_allowed(agent=bob.agent, action="context_write", target="error")


def test_disabled_policies_are_ignored(alice):
    policy(effect="deny", action="send", target="*", enabled=False)
    assert access_allowed(agent=alice.agent, action="send", target="bob")


def test_a_refusal_raises_forbidden_and_is_audited(alice):
    policy(effect="deny", action="subscribe", target="secret.*")
    with pytest.raises(Forbidden):
        access_check(
            agent=alice.agent, action="subscribe", target="secret.plans", source="10.0.0.9"
        )
    event = AuditEvent.objects.get(outcome="refused")
    assert (event.actor, event.action, event.target, event.outcome, event.source) == (
        "alice",
        "subscribe",
        "secret.plans",
        "refused",
        "10.0.0.9",
    )


def test_allowed_actions_are_not_audited(alice):
    access_check(agent=alice.agent, action="send", target="bob")
    assert not AuditEvent.objects.filter(action="send").exists()
