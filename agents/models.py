import hashlib
import hmac
import secrets
import uuid
from datetime import timedelta

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

AGENT_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
agent_id_validator = RegexValidator(
    AGENT_ID_PATTERN,
    "agent_id must be 1-64 characters of a-z, 0-9, '.', '_' or '-', "
    "starting with a letter or digit.",
)


def digest(raw: str) -> str:
    """Return the SHA-256 hex digest of a high-entropy secret.

    Secrets are 256-bit random strings, so a fast hash is enough: there is nothing to brute-force.
    """
    return hashlib.sha256(raw.encode()).hexdigest()


def digests_match(raw: str, stored: str) -> bool:
    return hmac.compare_digest(digest(raw), stored)


def heartbeat_interval() -> int:
    return settings.HUB["HEARTBEAT_INTERVAL"]


def liveness_cutoff():
    """Agents seen after this moment count as alive: three missed heartbeats make one offline."""
    return timezone.now() - timedelta(seconds=3 * heartbeat_interval())


class AgentQuerySet(models.QuerySet):
    def active(self):
        return self.filter(state=Agent.State.ACTIVE)

    @staticmethod
    def _has_open_connection():
        return Exists(Connection.objects.open().filter(agent=OuterRef("pk")))

    def with_open_connection(self):
        return self.annotate(has_open_connection=self._has_open_connection())

    # online() and offline() filter on the subquery itself rather than on the annotation, so they
    # compose with any queryset, values() ones included, and add no column of their own.
    def online(self):
        return self.filter(self._has_open_connection() | Q(last_seen_at__gte=liveness_cutoff()))

    def offline(self):
        return self.filter(
            ~self._has_open_connection()
            & (Q(last_seen_at__isnull=True) | Q(last_seen_at__lt=liveness_cutoff()))
        )

    def with_capabilities(self, names):
        """Keep agents that have every capability in names.

        One join per name and no DISTINCT: an agent holds a name at most once
        (capability_unique_per_agent), so no join can repeat a row, and the database may drive
        the query from capability_name_idx.
        """
        qs = self
        for name in names:
            qs = qs.filter(capabilities__name=name)
        return qs

    def matching(self, text: str):
        """Keep agents whose id, name, description or a capability name contains text."""
        # EXISTS rather than a join on capabilities: a join repeats an agent once per matching
        # capability and would need DISTINCT over every selected column, count included.
        return self.filter(
            Q(agent_id__icontains=text)
            | Q(name__icontains=text)
            | Q(description__icontains=text)
            | Exists(Capability.objects.filter(agent=OuterRef("pk"), name__icontains=text))
        )

    def profile_values(self):
        """Select what a public profile shows, as dicts: no model instances, no secret digest."""
        return self.with_open_connection().values(
            "pk",
            "agent_id",
            "name",
            "description",
            "metadata",
            "state",
            "last_seen_at",
            "created_at",
            "updated_at",
            "has_open_connection",
        )


class Agent(models.Model):
    """A machine identity: registers, authenticates with its secret and talks through the hub."""

    class State(models.TextChoices):
        ACTIVE = "active"
        DISABLED = "disabled"
        DEREGISTERED = "deregistered"

    agent_id = models.CharField(max_length=64, unique=True, validators=[agent_id_validator])
    name = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    secret_digest = models.CharField(max_length=64, editable=False)
    state = models.CharField(max_length=16, choices=State.choices, default=State.ACTIVE)
    # Tokens issued before this moment are refused: revoking "all tokens" is one column write.
    tokens_valid_after = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    enrolled_with = models.ForeignKey(
        "EnrollmentKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="agents"
    )

    objects = AgentQuerySet.as_manager()

    # Lets DRF treat an authenticated agent as request.user.
    is_authenticated = True
    is_anonymous = False
    is_staff = False
    is_superuser = False

    class Meta:
        ordering = ["agent_id"]
        indexes = [
            # status=online|offline filters and the liveness sweep scan by last_seen_at.
            models.Index(fields=["state", "last_seen_at"], name="agent_state_seen_idx"),
        ]

    def __str__(self):
        return self.agent_id

    @property
    def is_active(self):
        return self.state == self.State.ACTIVE

    def get_status(self, *, has_open_connection=None) -> str:
        """Derive liveness from open connections and the last sign of life; never stored."""
        if has_open_connection is None:
            has_open_connection = getattr(self, "has_open_connection", None)
        if has_open_connection is None:
            has_open_connection = self.connections.open().exists()
        return self.status_from(
            has_open_connection=has_open_connection,
            last_seen_at=self.last_seen_at,
            cutoff=liveness_cutoff(),
        )

    @staticmethod
    def status_from(*, has_open_connection: bool, last_seen_at, cutoff) -> str:
        """Derive liveness from stored facts, for callers that hold rows rather than agents.

        cutoff is liveness_cutoff(), passed in so a whole page of agents is judged at one moment.
        """
        if has_open_connection or (last_seen_at and last_seen_at >= cutoff):
            return "online"
        return "offline"

    def set_secret(self) -> str:
        raw = "as_" + secrets.token_urlsafe(32)
        self.secret_digest = digest(raw)
        return raw

    def check_secret(self, raw: str) -> bool:
        return bool(self.secret_digest) and digests_match(raw, self.secret_digest)


class Capability(models.Model):
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="capabilities")
    name = models.CharField(max_length=100)
    version = models.CharField(max_length=50, blank=True)
    description = models.TextField(blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "name"], name="capability_unique_per_agent"),
        ]
        indexes = [
            # Discovery: ?capability=NAME joins on name.
            models.Index(fields=["name", "agent"], name="capability_name_idx"),
        ]
        verbose_name_plural = "capabilities"

    def __str__(self):
        return f"{self.name} {self.version}".strip()


class EnrollmentKeyQuerySet(models.QuerySet):
    def usable(self):
        now = timezone.now()
        return self.filter(
            Q(revoked_at__isnull=True),
            Q(expires_at__isnull=True) | Q(expires_at__gt=now),
            Q(max_uses__isnull=True) | Q(uses__lt=models.F("max_uses")),
        )


class EnrollmentKey(models.Model):
    """An operator-issued key that admits a limited number of agent registrations."""

    label = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(max_length=12, editable=False)
    key_digest = models.CharField(max_length=64, unique=True, editable=False)
    max_uses = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty means unlimited."
    )
    uses = models.PositiveIntegerField(default=0, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = EnrollmentKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.prefix}… {self.label}".strip()

    def get_status(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= timezone.now():
            return "expired"
        if self.max_uses is not None and self.uses >= self.max_uses:
            return "spent"
        return "usable"


class IssuedToken(models.Model):
    """A JWT handed to an agent, by id only; the token itself is never stored."""

    class Type(models.TextChoices):
        ACCESS = "access"
        REFRESH = "refresh"

    jti = models.CharField(max_length=64, unique=True)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="tokens")
    token_type = models.CharField(max_length=8, choices=Type.choices)
    issued_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-issued_at"]
        indexes = [
            # The purge task drops expired rows.
            models.Index(fields=["expires_at"], name="token_expiry_idx"),
        ]

    def __str__(self):
        return f"{self.token_type} {self.jti[:8]}… for {self.agent_id}"

    def get_status(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "valid"


class ConnectionQuerySet(models.QuerySet):
    def open(self):
        return self.filter(closed_at__isnull=True)

    def stale(self):
        return self.open().filter(last_seen_at__lt=liveness_cutoff())


class Connection(models.Model):
    """One WebSocket session of an agent on one server process."""

    session_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="connections")
    server = models.CharField(max_length=200)
    channel_name = models.CharField(max_length=200)
    remote_addr = models.CharField(max_length=64, blank=True)
    user_agent = models.CharField(max_length=300, blank=True)
    opened_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)
    close_code = models.PositiveIntegerField(null=True, blank=True)

    objects = ConnectionQuerySet.as_manager()

    class Meta:
        ordering = ["-opened_at"]
        indexes = [
            # Online status and "is the recipient connected": open connections of one agent.
            models.Index(
                fields=["agent"], condition=Q(closed_at__isnull=True), name="connection_open_idx"
            ),
            # The liveness sweep: open connections by last sign of life.
            models.Index(
                fields=["last_seen_at"],
                condition=Q(closed_at__isnull=True),
                name="connection_seen_idx",
            ),
        ]

    def __str__(self):
        return f"{self.agent_id} on {self.server} ({self.session_id})"

    @property
    def is_open(self):
        return self.closed_at is None
