from django.db import models


class AccessPolicy(models.Model):
    """One operator rule: who (subject) may or may not do what (action) to which target."""

    class Effect(models.TextChoices):
        ALLOW = "allow"
        DENY = "deny"

    class SubjectKind(models.TextChoices):
        ALL = "all", "every agent"
        AGENT = "agent", "agent id"
        CAPABILITY = "capability", "agents with capability"

    class Action(models.TextChoices):
        SEND = "send", "send direct messages and requests to agents"
        BROADCAST = "broadcast", "broadcast to every agent"
        PUBLISH = "publish", "publish to topics"
        SUBSCRIBE = "subscribe", "subscribe to topics"
        CONTEXT_READ = "context_read", "read context types"
        CONTEXT_WRITE = "context_write", "write context types"

    name = models.CharField(max_length=200)
    enabled = models.BooleanField(default=True)
    effect = models.CharField(max_length=5, choices=Effect.choices, default=Effect.ALLOW)
    subject_kind = models.CharField(
        max_length=10, choices=SubjectKind.choices, default=SubjectKind.ALL
    )
    subject = models.CharField(
        max_length=100, blank=True, help_text="Agent id or capability name; empty for every agent."
    )
    action = models.CharField(max_length=16, choices=Action.choices)
    target = models.CharField(
        max_length=200,
        default="*",
        help_text="'*' for any; an exact agent id, topic or context type; or 'prefix.*'.",
    )
    priority = models.IntegerField(
        default=0, help_text="Higher priorities win; at equal priority deny wins over allow."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-priority", "name"]
        verbose_name_plural = "access policies"

    def __str__(self):
        who = self.subject or "every agent"
        return f"{self.effect} {who} {self.action} {self.target}"


class PolicySettings(models.Model):
    """The single row holding the default decision when no policy matches."""

    default_effect = models.CharField(
        max_length=5, choices=AccessPolicy.Effect.choices, default=AccessPolicy.Effect.ALLOW
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "policy settings"
        verbose_name_plural = "policy settings"

    def __str__(self):
        return f"default: {self.default_effect}"


class AuditEvent(models.Model):
    """Who did what to what, from where, and whether it was allowed. Never edited."""

    class Outcome(models.TextChoices):
        OK = "ok"
        REFUSED = "refused"

    class ActorType(models.TextChoices):
        AGENT = "agent"
        OPERATOR = "operator"
        SYSTEM = "system"
        ANONYMOUS = "anonymous"

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor_type = models.CharField(max_length=10, choices=ActorType.choices)
    actor = models.CharField(max_length=150, blank=True)
    action = models.CharField(max_length=64)
    target = models.CharField(max_length=200, blank=True)
    outcome = models.CharField(max_length=8, choices=Outcome.choices, default=Outcome.OK)
    source = models.CharField(max_length=64, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at"]
        indexes = [
            # The admin's "what did this actor do" and refused-action filters.
            models.Index(fields=["actor", "-at"], name="audit_actor_idx"),
            models.Index(fields=["action", "-at"], name="audit_action_idx"),
        ]

    def __str__(self):
        return (
            f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.target} {self.outcome}"
        )
