import uuid

from django.db import models
from django.db.models import Q
from django.utils import timezone

from agents.models import Agent
from messaging.protocol import isoformat


class ContextEntryQuerySet(models.QuerySet):
    def live(self, now=None):
        """Entries that have not expired; expiry counts at once, not only after a purge."""
        now = now or timezone.now()
        return self.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))

    def expired(self, now=None):
        return self.filter(expires_at__lte=now or timezone.now())


class ContextEntry(models.Model):
    """What one agent shares with the fleet: a typed JSON payload, versioned, with an expiry."""

    class Type(models.TextChoices):
        TASK_RESULT = "task_result"
        STATE_UPDATE = "state_update"
        ERROR = "error"
        METADATA = "metadata"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="context_entries")
    context_type = models.CharField(max_length=16, choices=Type.choices)
    # The owner's own name for the entry, so it can upsert named state; unique per owner. NULL,
    # not "", marks "no key": the partial unique constraint and index skip NULLs.
    key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    payload = models.JSONField()
    # Shown as written; ContextTag rows index the same tags for queries.
    tags = models.JSONField(default=list, blank=True)
    # Bumped by every write; the ETag and the If-Match precondition compare it.
    version = models.PositiveIntegerField(default=1)
    # Null: no expiry asked for (the entry then lives as long as the operator's maximum allows).
    ttl_seconds = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)

    objects = ContextEntryQuerySet.as_manager()

    class Meta:
        ordering = ["-updated_at", "-id"]
        verbose_name = "context entry"
        verbose_name_plural = "context entries"
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "key"],
                condition=Q(key__isnull=False),
                name="context_key_per_owner",
            ),
        ]
        # Each index serves one query of GET contexts/, newest first with (updated_at, id) as
        # the cursor; scanned backwards, an ascending index gives that order without a sort.
        # expires_at comes last so the liveness test, and so the capped count, reads the index
        # alone.
        indexes = [
            # No filter, and ?since= alone.
            models.Index(fields=["updated_at", "id", "expires_at"], name="context_recent_idx"),
            # ?agent_id=
            models.Index(
                fields=["owner", "updated_at", "id", "expires_at"], name="context_owner_idx"
            ),
            # ?agent_id=&context_type=, the most common pair ("bob's task results").
            models.Index(
                fields=["owner", "context_type", "updated_at", "id", "expires_at"],
                name="context_owner_type_idx",
            ),
            # ?context_type=
            models.Index(
                fields=["context_type", "updated_at", "id", "expires_at"], name="context_type_idx"
            ),
            # ?key= across owners ("everyone's 'status'").
            models.Index(
                fields=["key", "updated_at", "id", "expires_at"],
                condition=Q(key__isnull=False),
                name="context_key_idx",
            ),
            # The purge task: expired entries, oldest expiry first.
            models.Index(
                fields=["expires_at"],
                condition=Q(expires_at__isnull=False),
                name="context_expiry_idx",
            ),
        ]

    def __str__(self):
        label = self.key or str(self.id)
        return f"{self.context_type} {label} v{self.version}"

    @property
    def context_id(self) -> uuid.UUID:
        return self.id

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    def is_expired(self, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    def as_dict(self) -> dict:
        """Return the entry as REST and the change stream show it (the owner must be loaded)."""
        return {
            "context_id": str(self.id),
            "agent_id": self.owner.agent_id,
            "context_type": self.context_type,
            "key": self.key,
            "payload": self.payload,
            "tags": list(self.tags),
            "version": self.version,
            "ttl_seconds": self.ttl_seconds,
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
            "expires_at": isoformat(self.expires_at) if self.expires_at else None,
        }


class ContextTag(models.Model):
    """One tag of one entry: the index behind ?tag= queries.

    It copies what a tag query filters and sorts on (context_type, updated_at, expires_at; the
    services rewrite them with every write), so such a query reads this table's index in
    result order and touches an entry only to show it.
    """

    entry = models.ForeignKey(ContextEntry, on_delete=models.CASCADE, related_name="tag_rows")
    tag = models.CharField(max_length=64)
    context_type = models.CharField(max_length=16, choices=ContextEntry.Type.choices)
    updated_at = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["entry", "tag"], name="context_tag_unique"),
        ]
        indexes = [
            # ?tag= newest first, with (updated_at, entry) as the cursor.
            models.Index(
                fields=["tag", "updated_at", "entry", "expires_at"], name="context_tag_idx"
            ),
            # ?tag=&context_type= ("urgent errors").
            models.Index(
                fields=["tag", "context_type", "updated_at", "entry", "expires_at"],
                name="context_tag_type_idx",
            ),
        ]

    def __str__(self):
        return self.tag


class ContextVersion(models.Model):
    """An earlier version of an entry, kept for the history until it falls out of the window."""

    entry = models.ForeignKey(ContextEntry, on_delete=models.CASCADE, related_name="versions")
    version = models.PositiveIntegerField()
    payload = models.JSONField()
    tags = models.JSONField(default=list)
    ttl_seconds = models.PositiveIntegerField(null=True, blank=True)
    # When this version was written.
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["-version"]
        constraints = [
            # Also the index of "versions of one entry, newest first" and of the trim.
            models.UniqueConstraint(fields=["entry", "version"], name="context_version_unique"),
        ]

    def __str__(self):
        return f"{self.entry_id} v{self.version}"

    def as_dict(self) -> dict:
        return {
            "version": self.version,
            "payload": self.payload,
            "tags": list(self.tags),
            "ttl_seconds": self.ttl_seconds,
            "updated_at": isoformat(self.updated_at),
        }
