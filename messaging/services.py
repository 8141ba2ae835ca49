"""Accepting, delivering, acknowledging and expiring messages.

The database is the source of truth: a message and one delivery row per recipient are committed
before the sender hears `accepted`. The channel layer only tells a connected recipient's sockets
that something is waiting (PITFALLS P1, P2); whatever it drops is replayed from the database.
"""

import logging
import random
import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, F, JSONField, OuterRef, Q, Value
from django.utils import timezone

from agents.models import Agent, Connection
from agents.services import HubError
from ops import telemetry
from security.models import AccessPolicy
from security.services import access_check, access_filter, audit_record

from . import live, protocol
from .models import Delivery, Mailbox, Message, Subscription

logger = logging.getLogger(__name__)

# Bound the number of query parameters per statement (SQLite allows 32766, older builds 999).
CHUNK = 500


class UnknownRecipient(HubError):
    code = protocol.UNKNOWN_RECIPIENT
    status = 404


class NoResponders(HubError):
    code = protocol.NO_RESPONDERS
    status = 404


class NotFound(HubError):
    code = "not_found"
    status = 404


class ReplyRefused(HubError):
    """A reply that names no request this agent received; the frame's in_reply_to is wrong."""

    code = protocol.INVALID_FRAME


@dataclass(frozen=True)
class Accepted:
    message_id: uuid.UUID
    status: str
    recipients: int
    duplicate: bool
    recipient_ids: tuple = ()

    def as_dict(self) -> dict:
        return {
            "message_id": str(self.message_id),
            "status": self.status,
            "recipients": self.recipients,
            "duplicate": self.duplicate,
        }


def _stored_json(payload):
    """Return what to save in a JSONField: Django writes a bare None as SQL NULL, not JSON null."""
    return Value(None, JSONField()) if payload is None else payload


def chunks(items, size=CHUNK):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _next_seqs(recipient_ids: list[int]) -> dict[int, int]:
    """Take the next sequence number of each recipient's mailbox, inside the caller's transaction.

    Rows are locked in primary-key order, so concurrent fan-outs cannot deadlock; the lock is
    held until commit, so per-recipient commit order equals sequence order.
    """
    ids = sorted(recipient_ids)
    for chunk in chunks(ids):
        locked = set(
            Mailbox.objects.select_for_update()
            .filter(agent_id__in=chunk)
            .order_by("agent_id")
            .values_list("agent_id", flat=True)
        )
        missing = [agent_id for agent_id in chunk if agent_id not in locked]
        if missing:
            Mailbox.objects.bulk_create(
                [Mailbox(agent_id=agent_id) for agent_id in missing], ignore_conflicts=True
            )
            list(
                Mailbox.objects.select_for_update()
                .filter(agent_id__in=missing)
                .order_by("agent_id")
                .values_list("agent_id", flat=True)
            )
        Mailbox.objects.filter(agent_id__in=chunk).update(last_seq=F("last_seq") + 1)
    seqs = {}
    for chunk in chunks(ids):
        seqs.update(Mailbox.objects.filter(agent_id__in=chunk).values_list("agent_id", "last_seq"))
    return seqs


def _connected(recipient_ids) -> set[int]:
    connected = set()
    for chunk in chunks(list(recipient_ids)):
        connected.update(
            Connection.objects.open()
            .filter(agent_id__in=chunk)
            # Without order_by() the model's ordering column joins the DISTINCT.
            .order_by()
            .values_list("agent_id", flat=True)
            .distinct()
        )
    return connected


def duplicate_of(sender: Agent, client_id: str) -> Accepted | None:
    message = Message.objects.filter(sender=sender, client_id=client_id).first()
    if message is None:
        return None
    # "delivered" only if every recipient got it; an expired or dead-lettered one never did.
    undelivered = message.deliveries.exclude(
        status__in=(Delivery.Status.DELIVERED, Delivery.Status.ACKED)
    ).exists()
    status = "queued" if undelivered else "delivered"
    return Accepted(message.id, status, message.recipient_count, duplicate=True)


def recipients_of(*, sender: Agent, kind: str, to: str | None, topic: str | None) -> list[int]:
    if kind in (Message.Kind.DIRECT, Message.Kind.REQUEST):
        agent_pk = Agent.objects.active().filter(agent_id=to).values_list("pk", flat=True).first()
        if agent_pk is None:
            raise UnknownRecipient(f"No active agent {to!r}.")
        return [agent_pk]
    if kind == Message.Kind.BROADCAST:
        return list(Agent.objects.active().exclude(pk=sender.pk).values_list("pk", flat=True))
    subscribers = Subscription.objects.filter(topic=topic, agent__state=Agent.State.ACTIVE)
    # A subscription outlives a policy that now forbids it: such subscribers get nothing.
    return access_filter(
        agents=list(subscribers.values_list("agent_id", "agent__agent_id")),
        action=AccessPolicy.Action.SUBSCRIBE,
        target=topic,
    )


def authorize_send(*, sender: Agent, kind: str, to: str | None, topic: str | None) -> None:
    if kind == Message.Kind.BROADCAST:
        access_check(agent=sender, action=AccessPolicy.Action.BROADCAST, target="*")
    elif kind == Message.Kind.TOPIC:
        access_check(agent=sender, action=AccessPolicy.Action.PUBLISH, target=topic)
    else:
        access_check(agent=sender, action=AccessPolicy.Action.SEND, target=to)


def message_send(
    *,
    sender: Agent,
    kind: str,
    payload,
    to: str | None = None,
    topic: str | None = None,
    client_id: str | None = None,
    ttl: float | None = None,
) -> Accepted:
    """Store a message and a delivery per recipient, then nudge the connected ones after commit.

    A repeat of a client id answers the first message with duplicate=True and delivers nothing.
    """
    if client_id is not None and (duplicate := duplicate_of(sender, client_id)):
        return duplicate
    authorize_send(sender=sender, kind=kind, to=to, topic=topic)
    recipient_ids = recipients_of(sender=sender, kind=kind, to=to, topic=topic)
    now = timezone.now()
    expires_at = now + timedelta(seconds=ttl) if ttl else None
    message = Message(
        sender=sender,
        kind=kind,
        topic=topic or "",
        payload=_stored_json(payload),
        client_id=client_id,
        recipient_count=len(recipient_ids),
        created_at=now,
        expires_at=expires_at,
    )
    try:
        with transaction.atomic():
            message.save(force_insert=True)
            seqs = _next_seqs(recipient_ids)
            Delivery.objects.bulk_create(
                [
                    Delivery(
                        message=message,
                        recipient_id=recipient_id,
                        seq=seqs[recipient_id],
                        expires_at=expires_at,
                    )
                    for recipient_id in recipient_ids
                ],
                batch_size=CHUNK,
            )
            connected = _connected(recipient_ids)
            frames = {
                recipient_id: protocol.message_frame(
                    message_id=message.id,
                    seq=seqs[recipient_id],
                    kind=kind,
                    sender=sender.agent_id,
                    payload=payload,
                    sent_at=now,
                    topic=topic or "",
                )
                for recipient_id in connected
            }
            transaction.on_commit(lambda: live.notify_deliveries(frames))
    except IntegrityError:
        # Two sends with one client id raced past the first check: the loser answers the winner.
        if client_id is not None and (duplicate := duplicate_of(sender, client_id)):
            return duplicate
        raise
    status = "delivered" if len(connected) == len(recipient_ids) else "queued"
    telemetry.message_accepted(message_id=message.id, kind=kind, recipients=len(recipient_ids))
    return Accepted(message.id, status, len(recipient_ids), False, tuple(recipient_ids))


def request_recipient(*, requester: Agent, to: str | None, capability: str | None) -> str:
    """Choose who answers a request: the named agent, or one online holder of the capability."""
    if to is not None:
        return to
    # Exists(), not a join on connections__closed_at__isnull: that join also matches agents that
    # have no connection row at all, i.e. holders that never came online.
    holders = list(
        Agent.objects.active()
        .exclude(pk=requester.pk)
        .filter(
            Exists(Connection.objects.open().filter(agent=OuterRef("pk"))),
            capabilities__name=capability,
        )
        .order_by()
        .values_list("agent_id", flat=True)
        .distinct()
    )
    if not holders:
        raise NoResponders(f"No online agent has capability {capability!r}.")
    # A uniform choice spreads requests across holders without shared state between processes.
    return random.choice(holders)


def reply_send(*, replier: Agent, in_reply_to: uuid.UUID, payload) -> Message:
    """Log a reply, settle the request's delivery and route the answer to the requester."""
    request = (
        Message.objects.select_related("sender")
        .filter(pk=in_reply_to, kind=Message.Kind.REQUEST, deliveries__recipient=replier)
        .first()
    )
    if request is None:
        raise ReplyRefused(
            f"in_reply_to: no request {in_reply_to} was sent to you.", field="in_reply_to"
        )
    now = timezone.now()
    with transaction.atomic():
        reply = Message.objects.create(
            sender=replier,
            kind=Message.Kind.REPLY,
            payload=_stored_json(payload),
            in_reply_to=request.pk,
            created_at=now,
        )
        Delivery.objects.filter(message=request, recipient=replier).pending().update(
            status=Delivery.Status.ACKED, acked_at=now
        )
        transaction.on_commit(
            lambda: live.notify_response(
                request.sender_id,
                {"in_reply_to": str(request.pk), "from": replier.agent_id, "payload": payload},
            )
        )
    return reply


def deliveries_ack(
    *, recipient: Agent, message_ids: list | None = None, up_to_seq: int | None = None
) -> int:
    """Mark deliveries processed; answer how many changed. Acks of unknown ids are ignored."""
    pending = Delivery.objects.pending().filter(recipient=recipient)
    if up_to_seq is not None:
        pending = pending.filter(seq__lte=up_to_seq)
    else:
        pending = pending.filter(message_id__in=message_ids)
    return pending.update(status=Delivery.Status.ACKED, acked_at=timezone.now())


def deliveries_mark_delivered(*, recipient_id: int, seqs: list[int]) -> int:
    """Record that these deliveries were written to a socket (one attempt each)."""
    changed = 0
    for chunk in chunks(seqs):
        changed += (
            Delivery.objects.pending()
            .filter(recipient_id=recipient_id, seq__in=chunk)
            .update(
                status=Delivery.Status.DELIVERED,
                delivered_at=timezone.now(),
                attempts=F("attempts") + 1,
            )
        )
    return changed


def pending_frames(
    *,
    recipient: Agent,
    after_seq: int = 0,
    limit: int = 1000,
    mark=True,
    delivered_before=None,
) -> list:
    """Return the recipient's unexpired, unacknowledged messages as frames, oldest first.

    With delivered_before, rows already written to a socket are included only if that happened
    before then: the redelivery sweep resends what is due, not what was pushed a moment ago.
    """
    now = timezone.now()
    rows = Delivery.objects.pending().filter(recipient=recipient, seq__gt=after_seq)
    if delivered_before is not None:
        rows = rows.filter(Q(status=Delivery.Status.QUEUED) | Q(delivered_at__lt=delivered_before))
    rows = list(
        rows.exclude(expires_at__lte=now)
        .select_related("message", "message__sender")
        .order_by("seq")[:limit]
    )
    frames = [
        protocol.message_frame(
            message_id=row.message_id,
            seq=row.seq,
            kind=row.message.kind,
            sender=row.message.sender.agent_id,
            payload=row.message.payload,
            sent_at=row.message.created_at,
            topic=row.message.topic,
            redelivered=row.attempts > 0,
            attempt=row.attempts + 1,
        )
        for row in rows
    ]
    if mark and rows:
        deliveries_mark_delivered(recipient_id=recipient.pk, seqs=[row.seq for row in rows])
    return frames


def mailbox_last_seq(*, recipient: Agent, settle: bool = False) -> int:
    """Return the highest sequence number given to the recipient so far (0 for none).

    With settle=True, first wait for every send to the recipient that is still in flight: a send
    holds the mailbox row locked until it commits, so once the lock is ours each of them has
    either committed (and shows up in a backlog read after this) or has not yet checked which
    recipients are connected (and will see the caller's connection and nudge it).
    """
    if not settle:
        return (
            Mailbox.objects.filter(agent=recipient).values_list("last_seq", flat=True).first() or 0
        )
    with transaction.atomic():
        Mailbox.objects.bulk_create([Mailbox(agent=recipient)], ignore_conflicts=True)
        return (
            Mailbox.objects.select_for_update()
            .filter(agent=recipient)
            .values_list("last_seq", flat=True)
            .get()
        )


def pending_count(*, recipient: Agent) -> int:
    now = timezone.now()
    return (
        Delivery.objects.pending().filter(recipient=recipient).exclude(expires_at__lte=now).count()
    )


def message_for(*, agent: Agent, message_id) -> Message:
    """Return a message its sender or one of its recipients may read, else NotFound."""
    message = (
        Message.objects.select_related("sender")
        .filter(pk=message_id)
        .prefetch_related("deliveries__recipient")
        .first()
    )
    if message is None or not (
        message.sender_id == agent.pk
        or any(d.recipient_id == agent.pk for d in message.deliveries.all())
    ):
        raise NotFound("No such message.")
    return message


# --- Topics -------------------------------------------------------------------------------------


def topic_subscribe(*, agent: Agent, topic: str) -> bool:
    access_check(agent=agent, action=AccessPolicy.Action.SUBSCRIBE, target=topic)
    _, created = Subscription.objects.get_or_create(agent=agent, topic=topic)
    return created


def topic_unsubscribe(*, agent: Agent, topic: str) -> bool:
    deleted, _ = Subscription.objects.filter(agent=agent, topic=topic).delete()
    return bool(deleted)


# --- Sweeps -------------------------------------------------------------------------------------


def deliveries_redeliver_due() -> dict:
    """Dead-letter deliveries out of attempts; ask the sockets of the rest to replay.

    Queued rows of connected recipients are included too: their nudge may have been dropped.
    """
    hub = settings.HUB
    now = timezone.now()
    cutoff = now - timedelta(seconds=hub["REDELIVERY_DELAY"])
    dead = Delivery.objects.filter(
        status=Delivery.Status.DELIVERED,
        delivered_at__lt=cutoff,
        attempts__gte=hub["MAX_DELIVERY_ATTEMPTS"],
    ).update(status=Delivery.Status.DEAD)
    due = set(
        Delivery.objects.filter(status=Delivery.Status.DELIVERED, delivered_at__lt=cutoff)
        .values_list("recipient_id", flat=True)
        .distinct()
    )
    stuck = set(
        Delivery.objects.filter(status=Delivery.Status.QUEUED, message__created_at__lt=cutoff)
        .values_list("recipient_id", flat=True)
        .distinct()
    )
    recipients = _connected(due | stuck)
    if recipients:
        live.notify_replay(recipients, delivered_before=cutoff)
    if dead:
        audit_record(action="deliveries_dead_lettered", target=f"{dead} deliveries")
        logger.warning("dead-lettered deliveries", extra={"count": dead})
    return {"dead": dead, "replayed_recipients": len(recipients)}


def deliveries_expire() -> int:
    """Expire pending deliveries whose message outlived its ttl."""
    return (
        Delivery.objects.pending()
        .filter(expires_at__lte=timezone.now())
        .update(status=Delivery.Status.EXPIRED)
    )


def dead_letters_redeliver(*, deliveries, actor=None) -> int:
    """Give dead letters a fresh set of attempts and nudge their recipients (operator action)."""
    ids = [d.pk for d in deliveries]
    audit_record(actor=actor, action="dead_letters_redelivered", target=f"{len(ids)} deliveries")
    changed = Delivery.objects.filter(pk__in=ids, status=Delivery.Status.DEAD).update(
        status=Delivery.Status.QUEUED, attempts=0, delivered_at=None
    )
    recipients = set(Delivery.objects.filter(pk__in=ids).values_list("recipient_id", flat=True))
    # Queued rows are always replayed; the sockets apply their usual cutoff to the rest.
    transaction.on_commit(lambda: live.notify_replay(_connected(recipients)))
    return changed


def dead_letters_purge(*, deliveries, actor=None) -> int:
    audit_record(actor=actor, action="dead_letters_purged", target=f"{len(deliveries)} deliveries")
    deleted, _ = Delivery.objects.filter(
        pk__in=[d.pk for d in deliveries], status=Delivery.Status.DEAD
    ).delete()
    return deleted


def messages_purge_old() -> int:
    """Delete settled messages past the retention period; pending ones are kept.

    A delivery pending for a deregistered agent can never be delivered, so it does not keep its
    message forever.
    """
    cutoff = timezone.now() - timedelta(days=settings.HUB["MESSAGE_RETENTION_DAYS"])
    deliverable = Delivery.objects.pending().filter(
        message=OuterRef("pk"),
        recipient__state__in=(Agent.State.ACTIVE, Agent.State.DISABLED),
    )
    old = Message.objects.filter(created_at__lt=cutoff).exclude(Exists(deliverable))
    deleted, _ = old.delete()
    if deleted:
        audit_record(action="old_messages_purged", target=f"{deleted} rows")
    return deleted
