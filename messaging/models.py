from django.db import models
from django.db.models import Q

from agents.models import Agent

from . import ids


class Message(models.Model):
    """One accepted message; what it means for each recipient lives in its deliveries."""

    class Kind(models.TextChoices):
        DIRECT = "direct"
        BROADCAST = "broadcast"
        TOPIC = "topic"
        REQUEST = "request"
        REPLY = "reply"

    id = models.UUIDField(primary_key=True, default=ids.new_id, editable=False)
    # No index of its own: message_sender_idx starts with the sender (every index costs each send).
    sender = models.ForeignKey(
        Agent, on_delete=models.PROTECT, related_name="sent_messages", db_index=False
    )
    kind = models.CharField(max_length=10, choices=Kind.choices)
    topic = models.CharField(max_length=100, blank=True)
    payload = models.JSONField()
    # The sender's own id for the message: a repeat with the same id is the same message.
    # NULL, not "", means "no client id": the unique constraint must ignore messages without one.
    client_id = models.CharField(max_length=128, null=True, blank=True)  # noqa: DJ001
    in_reply_to = models.UUIDField(null=True, blank=True)
    recipient_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["sender", "client_id"],
                condition=Q(client_id__isnull=False),
                name="message_client_id_unique_per_sender",
            ),
        ]
        indexes = [
            # The admin's "messages from this agent", newest first.
            models.Index(fields=["sender", "-created_at"], name="message_sender_idx"),
        ]

    def __str__(self):
        return f"{self.kind} {self.id} from {self.sender.agent_id}"


class DeliveryQuerySet(models.QuerySet):
    def pending(self):
        """Deliveries the recipient has not acknowledged and that can still be delivered."""
        return self.filter(status__in=Delivery.PENDING)


class Delivery(models.Model):
    """One message for one recipient, numbered in acceptance order for that recipient."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        DELIVERED = "delivered"
        ACKED = "acked"
        EXPIRED = "expired"
        DEAD = "dead"

    PENDING = (Status.QUEUED, Status.DELIVERED)

    # No indexes of their own: delivery_once starts with the message, delivery_seq_unique with
    # the recipient (every index costs each send).
    #
    # No foreign key in the database to the message: a delivery is only ever inserted in the
    # transaction that inserts its message (messaging/batch.py, services.message_send), and
    # messages are deleted through the ORM, which deletes their deliveries first. The key's
    # check cost every delivery a lookup of its message that locked the row it had just
    # written: direct on PostgreSQL (hub only, four alternating runs each), 14,297-17,964 ->
    # 15,284-19,107 delivered/s (+2 to +7% a pair), PostgreSQL's CPU 9.1-9.2 -> 8.2-8.6 s. The
    # recipient's and the sender's keys stay: agents change under other transactions.
    message = models.ForeignKey(
        Message,
        on_delete=models.CASCADE,
        related_name="deliveries",
        db_index=False,
        db_constraint=False,
    )
    recipient = models.ForeignKey(
        Agent, on_delete=models.CASCADE, related_name="deliveries", db_index=False
    )
    seq = models.BigIntegerField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    delivered_at = models.DateTimeField(null=True, blank=True)
    acked_at = models.DateTimeField(null=True, blank=True)
    # Copied from the message so the expiry sweep needs no join.
    expires_at = models.DateTimeField(null=True, blank=True)

    objects = DeliveryQuerySet.as_manager()

    class Meta:
        ordering = ["recipient", "seq"]
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(fields=["recipient", "seq"], name="delivery_seq_unique"),
            models.UniqueConstraint(fields=["message", "recipient"], name="delivery_once"),
        ]
        indexes = [
            # Inbox, reconnect replay and ack by up_to_seq: a recipient's pending rows in seq order.
            models.Index(
                fields=["recipient", "seq"],
                condition=Q(status__in=["queued", "delivered"]),
                name="delivery_pending_idx",
            ),
            # Redelivery sweep: delivered but unacknowledged rows by age.
            models.Index(
                fields=["delivered_at"],
                condition=Q(status="delivered"),
                name="delivery_unacked_idx",
            ),
            # Expiry sweep: pending rows with a deadline.
            models.Index(
                fields=["expires_at"],
                condition=Q(status__in=["queued", "delivered"], expires_at__isnull=False),
                name="delivery_expiry_idx",
            ),
            # Dead letters for operators.
            models.Index(fields=["status"], condition=Q(status="dead"), name="delivery_dead_idx"),
        ]

    def __str__(self):
        return f"#{self.seq} for {self.recipient_id}: {self.status}"


class DeadLetter(Delivery):
    """Deliveries that ran out of attempts, shown to operators on their own page."""

    class Meta:
        proxy = True
        verbose_name = "dead letter"


class Mailbox(models.Model):
    """The per-recipient sequence counter, kept off the Agent row to avoid lock contention."""

    agent = models.OneToOneField(Agent, on_delete=models.CASCADE, primary_key=True)
    last_seq = models.BigIntegerField(default=0)

    def __str__(self):
        return f"mailbox of {self.agent_id} at {self.last_seq}"


class Subscription(models.Model):
    """A durable topic subscription: kept across reconnects until the agent unsubscribes."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="subscriptions")
    topic = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["topic"]
        constraints = [
            models.UniqueConstraint(fields=["topic", "agent"], name="subscription_unique"),
        ]

    def __str__(self):
        return f"{self.agent_id} → {self.topic}"
