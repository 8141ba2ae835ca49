"""Registry work that spans models or has side effects: enrollment, tokens, liveness.

Every entry point (REST views, the WebSocket consumer, Celery tasks, admin actions, management
commands) calls these functions, so a rule lives in exactly one place.
"""

import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.contrib.auth import authenticate, get_user_model
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from security.services import audit_record

from . import live
from .errors import Forbidden, HubError  # noqa: F401  (re-exported for callers)
from .models import (
    Agent,
    Capability,
    Connection,
    EnrollmentKey,
    IssuedToken,
    digest,
    digests_match,
)

logger = logging.getLogger(__name__)

RESERVED_AGENT_IDS = frozenset({"me"})

CLOSE_NOT_AUTHENTICATED = 4401
CLOSE_AGENT_DISABLED = 4403


class TokenRejected(HubError):
    code = "not_authenticated"
    status = 401


class EnrollmentRefused(HubError):
    code = "enrollment_refused"
    status = 403


class EnrollmentKeyInvalid(EnrollmentRefused):
    """No such key: the caller has not authenticated at all (a known but spent key is a 403)."""

    code = "enrollment_key_invalid"
    status = 401


class AgentIdTaken(HubError):
    code = "agent_id_taken"
    status = 409


# --- Enrollment keys ----------------------------------------------------------------------------


def enrollment_key_create(
    *, label: str = "", max_uses: int | None = None, expires_in: int | None = None, created_by=None
) -> tuple[EnrollmentKey, str]:
    """Create a key and return it with its raw value, which is never stored or shown again."""
    raw = "ek_" + secrets.token_urlsafe(32)
    key = EnrollmentKey.objects.create(
        label=label,
        prefix=raw[:11],
        key_digest=digest(raw),
        max_uses=max_uses,
        expires_at=timezone.now() + timedelta(seconds=expires_in) if expires_in else None,
        created_by=created_by,
    )
    audit_record(
        actor=created_by,
        action="enrollment_key_created",
        target=key.prefix,
        detail={"label": label[:100], "max_uses": max_uses, "expires_in": expires_in},
    )
    return key, raw


def enrollment_key_consume(*, raw: str) -> EnrollmentKey:
    """Spend one use of a key; call inside the registration transaction so a failure refunds it."""
    key = EnrollmentKey.objects.filter(key_digest=digest(raw)).first()
    if key is None:
        raise EnrollmentKeyInvalid("Unknown enrollment key.")
    # A conditional update, so two registrations racing for the last use cannot both win.
    spent = EnrollmentKey.objects.usable().filter(pk=key.pk).update(uses=F("uses") + 1)
    if not spent:
        raise EnrollmentRefused(
            f"Enrollment key is {key.get_status()}.", code="enrollment_key_" + key.get_status()
        )
    return key


def enrollment_key_revoke(*, key: EnrollmentKey, actor=None) -> None:
    audit_record(actor=actor, action="enrollment_key_revoked", target=key.prefix)
    EnrollmentKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )


# --- Agents -------------------------------------------------------------------------------------


def _set_capabilities(agent: Agent, capabilities: list[dict]) -> None:
    agent.capabilities.all().delete()
    Capability.objects.bulk_create(
        Capability(
            agent=agent,
            name=cap["name"],
            version=cap.get("version", ""),
            description=cap.get("description", ""),
        )
        for cap in capabilities
    )


def agent_register(**fields) -> tuple[Agent, str]:
    """Register an agent and return it with its raw secret (shown once, stored as a digest)."""
    try:
        return _agent_register(**fields)
    except (EnrollmentRefused, AgentIdTaken) as exc:
        # Audited here, outside the rolled-back transaction, so the refusal is kept.
        audit_record(
            actor=fields.get("actor") or "anonymous",
            action="agent_registration_refused",
            target=fields.get("agent_id", ""),
            outcome="refused",
            detail={"code": exc.code},
        )
        raise


@transaction.atomic
def _agent_register(
    *,
    agent_id: str,
    name: str = "",
    description: str = "",
    capabilities: list[dict] = (),
    metadata: dict | None = None,
    enrollment_key: str | None = None,
    actor=None,
) -> tuple[Agent, str]:
    if agent_id in RESERVED_AGENT_IDS:
        raise AgentIdTaken(f"agent_id {agent_id!r} is reserved.")
    key = enrollment_key_consume(raw=enrollment_key) if enrollment_key is not None else None
    agent = Agent(
        agent_id=agent_id,
        name=name,
        description=description,
        metadata=metadata or {},
        enrolled_with=key,
    )
    raw_secret = agent.set_secret()
    try:
        with transaction.atomic():
            agent.save()
    except IntegrityError:
        raise AgentIdTaken(f"agent_id {agent_id!r} is already registered.") from None
    _set_capabilities(agent, list(capabilities))
    audit_record(
        actor=actor or (f"enrollment key {key.prefix}" if key else None),
        action="agent_registered",
        target=agent_id,
        detail={"enrollment_key": key.prefix} if key else {},
    )
    logger.info("agent registered", extra={"agent_id": agent_id})
    return agent, raw_secret


@transaction.atomic
def agent_update(*, agent: Agent, **changes) -> Agent:
    capabilities = changes.pop("capabilities", None)
    fields = [field for field in ("name", "description", "metadata") if field in changes]
    for field in fields:
        setattr(agent, field, changes[field])
    if fields:
        agent.save(update_fields=[*fields, "updated_at"])
    if capabilities is not None:
        _set_capabilities(agent, capabilities)
    return agent


def _agent_set_state(agent: Agent, state: str, close_code: int, actor) -> None:
    audit_record(actor=actor or agent, action=f"agent_{state}", target=agent.agent_id)
    with transaction.atomic():
        # Deregistration is final: a retired agent is never disabled, or enabled, again.
        changed = (
            Agent.objects.filter(pk=agent.pk)
            .exclude(state=Agent.State.DEREGISTERED)
            .update(state=state, updated_at=timezone.now())
        )
        if not changed:
            agent.refresh_from_db(fields=["state"])
            return
        agent.state = state
        agent_tokens_revoke(agent=agent)
        connections_close(agent=agent, code=close_code)


def agent_deregister(*, agent: Agent, actor=None) -> None:
    """Retire an agent: tokens revoked, sockets closed everywhere; its history stays."""
    _agent_set_state(agent, Agent.State.DEREGISTERED, CLOSE_AGENT_DISABLED, actor)
    logger.info("agent deregistered", extra={"agent_id": agent.agent_id})


def agent_disable(*, agent: Agent, actor=None) -> None:
    _agent_set_state(agent, Agent.State.DISABLED, CLOSE_AGENT_DISABLED, actor)
    logger.info("agent disabled", extra={"agent_id": agent.agent_id})


def agent_enable(*, agent: Agent, actor=None) -> None:
    audit_record(actor=actor, action="agent_enabled", target=agent.agent_id)
    Agent.objects.filter(pk=agent.pk, state=Agent.State.DISABLED).update(state=Agent.State.ACTIVE)
    agent.refresh_from_db(fields=["state"])


def agent_rotate_secret(*, agent: Agent, actor=None) -> str:
    """Give the agent a new secret and revoke every token issued under the old one."""
    audit_record(actor=actor, action="agent_secret_rotated", target=agent.agent_id)
    with transaction.atomic():
        raw = agent.set_secret()
        agent.save(update_fields=["secret_digest", "updated_at"])
        agent_tokens_revoke(agent=agent)
        connections_close(agent=agent, code=CLOSE_NOT_AUTHENTICATED)
    return raw


def agent_touch(*, agent: Agent, at: datetime | None = None) -> datetime:
    """Record a sign of life."""
    at = at or timezone.now()
    Agent.objects.filter(pk=agent.pk).update(last_seen_at=at)
    agent.last_seen_at = at
    return at


# --- Tokens -------------------------------------------------------------------------------------


def _timestamp(value: int) -> datetime:
    return datetime.fromtimestamp(value, tz=UTC)


def agent_authenticate(*, agent_id: str, secret: str) -> Agent:
    agent = Agent.objects.filter(agent_id=agent_id).first()
    if agent is None:
        # Compare anyway, so timing does not reveal which agent ids exist.
        digests_match(secret, "0" * 64)
    if agent is None or not agent.check_secret(secret):
        audit_record(
            actor=agent_id[:64], action="token_refused", target=agent_id[:64], outcome="refused"
        )
        raise TokenRejected("Invalid agent_id or agent_secret.", code="invalid_credentials")
    if not agent.is_active:
        audit_record(
            actor=agent,
            action="token_refused",
            target=agent_id,
            outcome="refused",
            detail={"code": f"agent_{agent.state}"},
        )
        raise TokenRejected(f"Agent is {agent.state}.", code=f"agent_{agent.state}")
    return agent


def tokens_issue(*, agent: Agent, action: str = "token_issued") -> dict:
    """Issue an access/refresh pair for an agent and record both token ids."""
    refresh = RefreshToken()
    refresh["agent_id"] = agent.agent_id
    access = refresh.access_token
    IssuedToken.objects.bulk_create(
        [
            IssuedToken(
                jti=token["jti"],
                agent=agent,
                token_type=token["token_type"],
                issued_at=_timestamp(token["iat"]),
                expires_at=_timestamp(token["exp"]),
            )
            for token in (refresh, access)
        ]
    )
    audit_record(
        actor=agent,
        action=action,
        target=agent.agent_id,
        detail={"access_jti": access["jti"][:8], "refresh_jti": refresh["jti"][:8]},
    )
    return {"access": str(access), "refresh": str(refresh)}


def tokens_refresh(*, raw_refresh: str) -> dict:
    """Rotate a refresh token: the old one is revoked and can never be used again."""
    try:
        return _tokens_refresh(raw_refresh)
    except TokenRejected as exc:
        # Audited here, outside the rolled-back transaction. A revoked refresh token presented
        # again may be a stolen copy of one its agent has already rotated.
        agent_id = getattr(exc, "agent_id", "")
        audit_record(
            actor=agent_id or "anonymous",
            action="token_refresh_refused",
            target=agent_id,
            outcome="refused",
            detail={"code": exc.code, "reason": exc.detail[:100]},
        )
        raise


def _tokens_refresh(raw_refresh: str) -> dict:
    try:
        refresh = RefreshToken(raw_refresh)
    except TokenError as exc:
        raise TokenRejected(str(exc), code="token_not_valid") from None
    if "agent_id" not in refresh:
        return _operator_tokens_refresh(raw_refresh)
    with transaction.atomic():
        # Conditional update: of two concurrent refreshes with one token, only one rotates.
        revoked = IssuedToken.objects.filter(
            jti=refresh["jti"], token_type=IssuedToken.Type.REFRESH, revoked_at__isnull=True
        ).update(revoked_at=timezone.now())
        if not revoked:
            refused = TokenRejected("Token is revoked.", code="token_not_valid")
            refused.agent_id = str(refresh["agent_id"])
            raise refused
        agent = Agent.objects.get(agent_id=refresh["agent_id"])
        if not agent.is_active:
            refused = TokenRejected(f"Agent is {agent.state}.", code=f"agent_{agent.state}")
            refused.agent_id = agent.agent_id
            raise refused
        return tokens_issue(agent=agent, action="token_refreshed")


def _operator_tokens_refresh(raw_refresh: str) -> dict:
    from rest_framework_simplejwt.serializers import TokenRefreshSerializer

    serializer = TokenRefreshSerializer(data={"refresh": raw_refresh})
    try:
        serializer.is_valid(raise_exception=True)
    except Exception as exc:  # simplejwt raises InvalidToken/TokenError
        raise TokenRejected(str(exc), code="token_not_valid") from None
    return serializer.validated_data


def operator_authenticate(*, request, username: str, password: str):
    """Return the staff user these credentials name, else audit the refusal and raise."""
    # Through Django's backends, so django-axes counts failures and locks out guessing.
    user = authenticate(request, username=username, password=password)
    if user is None or not user.is_staff:
        audit_record(
            actor=username[:150] or "anonymous",
            action="token_refused",
            target=username[:150],
            outcome="refused",
            detail={"code": "invalid_credentials", "operator": True},
        )
        raise TokenRejected("Invalid username or password.", code="invalid_credentials")
    return user


def operator_tokens_issue(*, user) -> dict:
    refresh = RefreshToken.for_user(user)
    access = refresh.access_token
    audit_record(
        actor=user,
        action="token_issued",
        target=user.get_username(),
        detail={"access_jti": access["jti"][:8], "refresh_jti": refresh["jti"][:8]},
    )
    return {"access": str(access), "refresh": str(refresh)}


@dataclass(frozen=True)
class Principal:
    """Who a valid access token speaks for: an agent, or an operator (a staff user)."""

    agent: Agent | None
    user: object | None
    token_expires_at: datetime
    token_jti: str = ""


def principal_from_access_token(raw: str) -> Principal:
    """Turn a raw access token into an agent or operator; the single choke point for tokens.

    Signature, algorithm (pinned in settings), expiry and token type are checked by simplejwt; the
    token id must be one we issued and have not revoked, and the agent must be active.
    """
    try:
        token = AccessToken(raw)
    except TokenError as exc:
        raise TokenRejected(str(exc), code="token_not_valid") from None
    expires_at = _timestamp(token["exp"])
    if "agent_id" in token:
        issued = (
            IssuedToken.objects.select_related("agent")
            .filter(jti=token.get("jti", ""), token_type=IssuedToken.Type.ACCESS)
            .first()
        )
        if issued is None or issued.agent.agent_id != token["agent_id"]:
            raise TokenRejected("Token is not recognised.", code="token_not_valid")
        # The agent's state comes first: disabling revokes its tokens too, and the client should
        # hear why (agent_disabled, WebSocket close 4403) rather than a bare "revoked" (4401).
        if not issued.agent.is_active:
            raise TokenRejected(
                f"Agent is {issued.agent.state}.", code=f"agent_{issued.agent.state}"
            )
        if issued.revoked_at is not None:
            raise TokenRejected("Token is revoked.", code="token_revoked")
        return Principal(
            agent=issued.agent, user=None, token_expires_at=expires_at, token_jti=issued.jti
        )
    user_id = token.get("user_id")
    user = get_user_model().objects.filter(pk=user_id, is_active=True, is_staff=True).first()
    if user is None:
        raise TokenRejected("Token does not belong to an active operator.", code="token_not_valid")
    return Principal(agent=None, user=user, token_expires_at=expires_at)


def token_revoke(*, token: IssuedToken, actor=None) -> None:
    audit_record(actor=actor, action="token_revoked", target=f"{token.token_type} {token.jti[:8]}")
    IssuedToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    if token.token_type == IssuedToken.Type.ACCESS:
        # A revoked access token may be holding sockets open: those sessions end now.
        connections_close(agent=token.agent, code=CLOSE_NOT_AUTHENTICATED, token_jti=token.jti)


def agent_tokens_revoke(*, agent: Agent, actor=None) -> int:
    if actor is not None:
        audit_record(actor=actor, action="tokens_revoked", target=agent.agent_id)
    return IssuedToken.objects.filter(agent=agent, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )


def tokens_purge_expired() -> int:
    deleted, _ = IssuedToken.objects.filter(
        expires_at__lt=timezone.now() - timedelta(days=1)
    ).delete()
    if deleted:
        audit_record(action="expired_tokens_purged", target=f"{deleted} token(s)")
    return deleted


# --- Connections and liveness -------------------------------------------------------------------


def connection_open(
    *, agent: Agent, channel_name: str, server: str, remote_addr: str = "", user_agent: str = ""
) -> Connection:
    now = timezone.now()
    connection = Connection.objects.create(
        agent=agent,
        channel_name=channel_name,
        server=server,
        remote_addr=remote_addr[:64],
        user_agent=user_agent[:300],
        opened_at=now,
        last_seen_at=now,
    )
    agent_touch(agent=agent, at=now)
    return connection


def connection_seen(*, connection: Connection) -> None:
    now = timezone.now()
    Connection.objects.filter(pk=connection.pk).update(last_seen_at=now)
    Agent.objects.filter(pk=connection.agent_id).update(last_seen_at=now)


def connection_closed(*, connection: Connection, code: int | None) -> None:
    """Record that a socket has ended (called by the consumer that held it)."""
    now = timezone.now()
    Connection.objects.filter(pk=connection.pk, closed_at__isnull=True).update(
        closed_at=now, close_code=code
    )
    Agent.objects.filter(pk=connection.agent_id).update(last_seen_at=now)


def connections_close(
    *,
    agent: Agent | None = None,
    connections=None,
    code: int,
    token_jti: str | None = None,
    actor=None,
) -> int:
    """Ask every process holding these sockets to close them, once the caller's change commits."""
    if connections is None:
        connections = Connection.objects.open().filter(agent=agent)
    targets = [(c.channel_name, c.agent_id) for c in connections]
    if actor is not None:
        audit_record(
            actor=actor,
            action="connections_closed",
            target=agent.agent_id if agent else f"{len(targets)} connection(s)",
            detail={"code": code},
        )

    def close_after_commit():
        if agent is not None and token_jti is None:
            # The agent group reaches sockets even if their Connection row is not committed yet.
            live.close_agent_sockets(agent.pk, code)
        # Each socket's own channel reaches it even when Redis has lost the group (restarted
        # without its data); a socket that gets both closes once.
        live.close_channels(targets, code, token_jti=token_jti)

    transaction.on_commit(close_after_commit)
    return len(targets)


def connections_sweep() -> int:
    """Close connections silent for three heartbeat intervals; their agents fall offline."""
    now = timezone.now()
    stale = list(Connection.objects.stale())
    if not stale:
        return 0
    Connection.objects.filter(pk__in=[c.pk for c in stale], closed_at__isnull=True).update(
        closed_at=now, close_code=1001
    )
    live.close_channels([(c.channel_name, c.agent_id) for c in stale], 1001)
    audit_record(
        action="connections_swept",
        target=f"{len(stale)} connection(s)",
        detail={"sessions": [str(c.session_id) for c in stale[:100]]},
    )
    logger.info("swept stale connections", extra={"count": len(stale)})
    return len(stale)
