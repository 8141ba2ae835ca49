"""Access policies and the audit log: one decision point for every transport.

REST views, the WebSocket consumer and any later interface ask `access_check`; a refusal raises
Forbidden (403 / `forbidden`) and is written to the audit log.
"""

import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass

from django.db import transaction

from agents.errors import Forbidden
from agents.models import Agent, Capability

from .models import AccessPolicy, AuditEvent, PolicySettings

logger = logging.getLogger(__name__)

# The client address of the request or socket being served; set by each transport on entry and
# carried into database threads by asgiref, so services can audit without threading it through.
request_source: ContextVar[str] = ContextVar("request_source", default="")

# Policies change rarely and are read on every send: each process keeps them this long (seconds).
POLICY_CACHE_SECONDS = 2.0
# Agents per query when loading capabilities in bulk (SQLite bounds query parameters).
CHUNK = 500


@dataclass(frozen=True)
class Rule:
    effect: str
    subject_kind: str
    subject: str
    action: str
    target: str
    priority: int

    def matches_target(self, target: str) -> bool:
        return target_matches(self.target, target)


def target_matches(pattern: str, target: str) -> bool:
    """Match '*', an exact name, or 'prefix.*' (the prefix and anything below it)."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        prefix = pattern[:-2]
        return target == prefix or target.startswith(prefix + ".")
    return pattern == target


class _PolicyCache:
    def __init__(self):
        self._lock = threading.Lock()
        self._loaded_at = float("-inf")
        self.rules: tuple[Rule, ...] = ()
        # The actions some rule is about: any other is decided by the default alone.
        self.actions: frozenset[str] = frozenset()
        self.default_effect = AccessPolicy.Effect.ALLOW

    def current(self) -> "_PolicyCache":
        if time.monotonic() - self._loaded_at > POLICY_CACHE_SECONDS:
            self.reload()
        return self

    def reload(self) -> None:
        rules = tuple(
            Rule(p.effect, p.subject_kind, p.subject, p.action, p.target, p.priority)
            for p in AccessPolicy.objects.filter(enabled=True).order_by("-priority")
        )
        settings_row = PolicySettings.objects.first()
        with self._lock:
            self.actions = frozenset(rule.action for rule in rules)  # first: see access_allowed
            self.rules = rules
            self.default_effect = (
                settings_row.default_effect if settings_row else AccessPolicy.Effect.ALLOW
            )
            self._loaded_at = time.monotonic()

    def invalidate(self) -> None:
        self._loaded_at = float("-inf")


policies = _PolicyCache()


def policies_changed() -> None:
    """Drop this process's cached policies; other processes refresh within the cache window."""
    transaction.on_commit(policies.invalidate)


def _subject_matches(rule: Rule, agent_id: str, capabilities: frozenset[str]) -> bool:
    if rule.subject_kind == AccessPolicy.SubjectKind.ALL:
        return True
    if rule.subject_kind == AccessPolicy.SubjectKind.AGENT:
        return rule.subject == agent_id
    return rule.subject in capabilities


def _relevant(state: _PolicyCache, action: str, target: str) -> list[Rule]:
    """The enabled rules about this action on this target, highest priority first."""
    return [r for r in state.rules if r.action == action and r.matches_target(target)]


def _needs_capabilities(rules: list[Rule]) -> bool:
    return any(r.subject_kind == AccessPolicy.SubjectKind.CAPABILITY for r in rules)


def _decide(rules: list[Rule], agent_id: str, capabilities: frozenset[str], default: str) -> bool:
    """Apply the highest-priority rules that match the subject (deny wins ties), else default."""
    decision = None
    decided_priority = None
    for rule in rules:  # ordered by priority, highest first
        if decided_priority is not None and rule.priority < decided_priority:
            break
        if not _subject_matches(rule, agent_id, capabilities):
            continue
        decided_priority = rule.priority
        if rule.effect == AccessPolicy.Effect.DENY:
            return False
        decision = True
    if decision is not None:
        return decision
    return default == AccessPolicy.Effect.ALLOW


def access_allowed(*, agent: Agent, action: str, target: str) -> bool:
    """Decide by the highest-priority matching policy (deny wins ties), else the default."""
    state = policies.current()
    if action not in state.actions:  # every message is checked: 2.2 -> 0.4 µs without rules
        return state.default_effect == AccessPolicy.Effect.ALLOW
    rules = _relevant(state, action, target)
    capabilities = frozenset()
    if _needs_capabilities(rules):
        capabilities = frozenset(
            Capability.objects.filter(agent=agent).values_list("name", flat=True)
        )
    return _decide(rules, agent.agent_id, capabilities, state.default_effect)


def access_filter(*, agents: list[tuple[int, str]], action: str, target: str) -> list[int]:
    """Return the primary keys of the agents, given as (pk, agent_id), allowed the action.

    One decision per agent as access_allowed makes it, with at most one query for all of them:
    fan-out asks this for every subscriber of a topic.
    """
    state = policies.current()
    rules = _relevant(state, action, target)
    if not rules:
        return [pk for pk, _ in agents] if state.default_effect == AccessPolicy.Effect.ALLOW else []
    capabilities: dict[int, set[str]] = {}
    if _needs_capabilities(rules):
        pks = [pk for pk, _ in agents]
        for start in range(0, len(pks), CHUNK):
            rows = Capability.objects.filter(agent_id__in=pks[start : start + CHUNK])
            for agent_pk, name in rows.values_list("agent_id", "name"):
                capabilities.setdefault(agent_pk, set()).add(name)
    return [
        pk
        for pk, agent_id in agents
        if _decide(rules, agent_id, frozenset(capabilities.get(pk, ())), state.default_effect)
    ]


def access_check(*, agent: Agent, action: str, target: str, source: str = "") -> None:
    """Raise Forbidden, and audit the refusal, unless the agent may do this."""
    if access_allowed(agent=agent, action=action, target=target):
        return
    access_refused(agent=agent, action=action, target=target, source=source)
    raise Forbidden(f"Not allowed to {action} {target!r}.")


def access_refused(
    *, agent: Agent, action: str, target: str, source: str = "", detail: dict | None = None
) -> None:
    """Record that an agent was refused an action; the caller answers the refusal."""
    audit_record(
        actor=agent,
        action=action,
        target=target,
        outcome=AuditEvent.Outcome.REFUSED,
        source=source or request_source.get(),
        detail=detail,
    )


def audit_record(
    *,
    actor=None,
    action: str,
    target: str = "",
    outcome: str = AuditEvent.Outcome.OK,
    source: str = "",
    detail: dict | None = None,
) -> AuditEvent | None:
    """Append to the audit log; an audit failure is logged and never breaks the action."""
    if actor is None:
        actor_type, actor_name = AuditEvent.ActorType.SYSTEM, ""
    elif isinstance(actor, Agent):
        actor_type, actor_name = AuditEvent.ActorType.AGENT, actor.agent_id
    elif isinstance(actor, str):
        actor_type, actor_name = AuditEvent.ActorType.ANONYMOUS, actor
    else:
        actor_type, actor_name = AuditEvent.ActorType.OPERATOR, actor.get_username()
    try:
        return AuditEvent.objects.create(
            actor_type=actor_type,
            actor=actor_name[:150],
            action=action[:64],
            target=str(target)[:200],
            outcome=outcome,
            source=(source or request_source.get())[:64],
            detail=detail or {},
        )
    except Exception:
        logger.exception("could not write audit event", extra={"action": action})
        return None
