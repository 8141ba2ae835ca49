"""The shared context store: writing, reading, querying, versioning and expiring entries.

Every entry point (REST views, the socket's watch frames, the purge task, admin actions) calls
these functions, so each rule lives in one place. Writes are optimistic: an update names the
version it read and a conditional UPDATE ... WHERE version = expected decides the race (STYLE
habit 8). Changes are announced on the channel layer after commit (contexts/live.py).
"""

import base64
import binascii
import functools
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import orjson
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from agents.errors import HubError
from agents.models import Agent
from security.models import AccessPolicy
from security.services import access_allowed, access_refused, audit_record

from . import live
from .models import ContextEntry, ContextTag, ContextVersion
from .protocol import CONTEXT_TYPES

logger = logging.getLogger(__name__)


class _Unset:
    def __repr__(self):
        return "UNSET"


# Marks an argument the caller did not give, where None is a meaningful value (ttl_seconds).
UNSET = _Unset()

READ = "read"
WRITE = "write"
# Attempts of an unconditional upsert that keeps losing races to other writers.
UPSERT_ATTEMPTS = 5


class ContextNotFound(HubError):
    code = "not_found"
    status = 404


class ContextForbidden(HubError):
    code = "forbidden"
    status = 403

    # What the audit log records about this refusal (access_refused's arguments), written by
    # `_audits_refusals` once any transaction around the refusal has rolled back.
    audit: dict | None = None


class PreconditionRequired(HubError):
    code = "precondition_required"
    status = 428


class VersionMismatch(HubError):
    """The entry is not at the version the writer named (or does not exist, for a keyed write)."""

    code = "version_mismatch"
    status = 412

    def __init__(self, current_version: int | None, detail: str | None = None):
        if detail is None:
            detail = f"The entry is at version {current_version}; re-read it and retry."
        super().__init__(detail)
        self.current_version = current_version


class ContextConflict(HubError):
    code = "conflict"
    status = 409


class ContextPayloadTooLarge(HubError):
    code = "payload_too_large"
    status = 413


class ContextInvalid(HubError):
    code = "invalid"
    status = 400


def _hub() -> dict:
    return settings.HUB


# --- Access -------------------------------------------------------------------------------------


# The access policy action (security.models.AccessPolicy) that governs each kind of access; the
# policy target is the context type.
POLICY_ACTIONS = {
    READ: AccessPolicy.Action.CONTEXT_READ,
    WRITE: AccessPolicy.Action.CONTEXT_WRITE,
}


def context_access_check(*, agent: Agent | None, context_type: str, action: str) -> bool:
    """Decide whether an agent may read or write entries of a context type.

    `agent` is None for an operator, whom Django model permissions govern instead. Every read,
    query, write, delete and watch asks here, so the operators' access policies (the same ones
    that govern messaging, on every transport) apply in this one place.
    """
    if agent is None:
        return True
    return access_allowed(agent=agent, action=POLICY_ACTIONS[action], target=context_type)


def _require(agent: Agent | None, context_type: str, action: str, context_id=None) -> None:
    if not context_access_check(agent=agent, context_type=context_type, action=action):
        refusal = ContextForbidden(f"You may not {action} {context_type} entries.")
        refusal.audit = {
            "agent": agent,
            "action": POLICY_ACTIONS[action],
            "target": context_type,
            "detail": {"context_id": str(context_id)} if context_id is not None else None,
        }
        raise refusal


def _refuse_not_owner(agent: Agent | None, entry: ContextEntry, detail: str) -> None:
    refusal = ContextForbidden(detail)
    if agent is not None:
        # Another agent trying to change an entry it does not own is worth an operator's look.
        refusal.audit = {
            "agent": agent,
            "action": POLICY_ACTIONS[WRITE],
            "target": entry.context_type,
            "detail": {"context_id": str(entry.pk), "reason": "not the owner"},
        }
    raise refusal


def _audits_refusals(function):
    """Record each refusal the function raises in the audit log, then let it propagate.

    Refusals are often raised inside a transaction that their exception rolls back; the record is
    written after that, so it is kept.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except ContextForbidden as refusal:
            if refusal.audit is not None:
                audit, refusal.audit = refusal.audit, None  # once, however deep the nesting
                access_refused(**audit)
            raise

    return wrapper


@_audits_refusals
def context_types_readable(*, agent: Agent | None, context_type: str | None = None) -> list[str]:
    """Return the context types the agent may read; a named type it may not read is refused."""
    if context_type is not None:
        _require(agent, context_type, READ)
        return [context_type]
    return [
        t for t in CONTEXT_TYPES if context_access_check(agent=agent, context_type=t, action=READ)
    ]


# --- Values -------------------------------------------------------------------------------------


def ttl_problem(ttl_seconds: int | None) -> str | None:
    """Say what is wrong with a requested ttl_seconds, or None when it is acceptable."""
    if ttl_seconds is None:
        return None
    maximum = _hub()["CONTEXT_MAX_TTL"]
    if ttl_seconds < 1:
        return "must be at least 1"
    if maximum and ttl_seconds > maximum:
        return f"must be at most {maximum} (the operator's maximum); null asks for that maximum"
    return None


def _resolve_ttl(ttl_seconds) -> int | None:
    if ttl_seconds is UNSET:
        return _hub()["CONTEXT_DEFAULT_TTL"]
    problem = ttl_problem(ttl_seconds)
    if problem:
        raise ContextInvalid(f"ttl_seconds: {problem}.")
    return ttl_seconds


def _expires_at(ttl_seconds: int | None, now: datetime) -> datetime | None:
    """Count expiry from the write; null ttl lives to the operator's maximum (0: forever)."""
    if ttl_seconds is None:
        maximum = _hub()["CONTEXT_MAX_TTL"]
        return now + timedelta(seconds=maximum) if maximum else None
    return now + timedelta(seconds=ttl_seconds)


def payload_check(payload) -> None:
    """Refuse payloads over the size limit, or that the socket's JSON encoder cannot write."""
    try:
        size = len(orjson.dumps(payload))
    except orjson.JSONEncodeError as exc:
        # Such as integers beyond 64 bits: storable, but no change frame could carry them.
        raise ContextInvalid(f"payload: cannot be encoded as JSON ({exc}).") from None
    limit = _hub()["MAX_PAYLOAD_BYTES"]
    if size > limit:
        raise ContextPayloadTooLarge(f"payload is {size} bytes; the limit is {limit} bytes.")


def _clean_tags(tags) -> list[str]:
    return list(dict.fromkeys(tags or ()))


# --- Writes -------------------------------------------------------------------------------------


def _announce_on_commit(changes: list[tuple[str, dict]]) -> None:
    transaction.on_commit(lambda: live.announce(changes))


def _insert(*, owner, context_type, payload, tags, ttl_seconds, key, now) -> ContextEntry:
    with transaction.atomic():
        entry = ContextEntry(
            owner=owner,
            context_type=context_type,
            key=key,
            payload=payload,
            tags=tags,
            version=1,
            ttl_seconds=ttl_seconds,
            created_at=now,
            updated_at=now,
            expires_at=_expires_at(ttl_seconds, now),
        )
        entry.save(force_insert=True)
        ContextTag.objects.bulk_create([_tag_row(entry, tag) for tag in tags])
        _announce_on_commit([("created", entry.as_dict())])
    return entry


def _tag_row(entry: ContextEntry, tag: str) -> ContextTag:
    return ContextTag(
        entry=entry,
        tag=tag,
        context_type=entry.context_type,
        updated_at=entry.updated_at,
        expires_at=entry.expires_at,
    )


def _sync_tags(entry: ContextEntry, old_tags: list[str]) -> None:
    """Make the entry's tag rows match its tags and its new updated_at and expires_at."""
    removed = set(old_tags) - set(entry.tags)
    if removed:
        ContextTag.objects.filter(entry=entry, tag__in=removed).delete()
    ContextTag.objects.filter(entry=entry).update(
        updated_at=entry.updated_at, expires_at=entry.expires_at
    )
    added = [tag for tag in entry.tags if tag not in old_tags]
    if added:
        ContextTag.objects.bulk_create([_tag_row(entry, tag) for tag in added])


def _write(*, context_id, writer: Agent | None, expected_version, changes: dict) -> ContextEntry:
    """Apply changes to a live entry the writer owns, as version + 1; the core of every update."""
    now = timezone.now()
    with transaction.atomic():
        entry = ContextEntry.objects.live(now).select_related("owner").filter(pk=context_id).first()
        if entry is None:
            raise ContextNotFound("No such context entry (or it has expired).")
        if writer is None or entry.owner_id != writer.pk:
            _refuse_not_owner(writer, entry, "Only the owner may change an entry.")
        _require(writer, entry.context_type, WRITE, entry.pk)
        for name in ("context_type", "key"):
            if name in changes and changes[name] != getattr(entry, name):
                raise ContextInvalid(
                    f"{name}: cannot change (the entry's is {getattr(entry, name)!r})."
                )
        if expected_version is UNSET:
            raise PreconditionRequired(
                f'Send If-Match: "{entry.version}" (the version you read) to change this entry.'
            )
        if expected_version is not None and entry.version != expected_version:
            raise VersionMismatch(entry.version)
        previous = ContextVersion(
            entry=entry,
            version=entry.version,
            payload=entry.payload,
            tags=entry.tags,
            ttl_seconds=entry.ttl_seconds,
            updated_at=entry.updated_at,
        )
        old_tags = list(entry.tags)
        if "payload" in changes:
            entry.payload = changes["payload"]
        if "tags" in changes:
            entry.tags = _clean_tags(changes["tags"])
        if "ttl_seconds" in changes:
            entry.ttl_seconds = changes["ttl_seconds"]
        entry.version = previous.version + 1
        entry.updated_at = now
        entry.expires_at = _expires_at(entry.ttl_seconds, now)
        # Conditional on the version read above: of two writers that read the same version,
        # the database lets exactly one through; the other sees 0 rows and gets 412.
        written = ContextEntry.objects.filter(pk=entry.pk, version=previous.version).update(
            payload=entry.payload,
            tags=entry.tags,
            ttl_seconds=entry.ttl_seconds,
            version=entry.version,
            updated_at=now,
            expires_at=entry.expires_at,
        )
        if not written:
            current = (
                ContextEntry.objects.live(now)
                .filter(pk=entry.pk)
                .values_list("version", flat=True)
                .first()
            )
            if current is None:
                raise ContextNotFound("No such context entry (or it has expired).")
            raise VersionMismatch(current)
        history = _hub()["CONTEXT_HISTORY"]
        if history > 1:
            previous.save(force_insert=True)
        ContextVersion.objects.filter(entry=entry, version__lte=entry.version - history).delete()
        _sync_tags(entry, old_tags)
        _announce_on_commit([("updated", entry.as_dict())])
    return entry


@_audits_refusals
def context_update(
    *, context_id, writer: Agent | None, expected_version, changes: dict
) -> ContextEntry:
    """Change an entry the writer owns, only if it is still at `expected_version`.

    `expected_version` None means `If-Match: *` (any current version); UNSET means the writer
    named no version, which is refused with 428 once the entry and the owner check out.
    `changes` holds any of payload, tags, ttl_seconds; context_type and key may be repeated but
    never changed.
    """
    if "payload" in changes:
        payload_check(changes["payload"])
    if "ttl_seconds" in changes:
        changes = {**changes, "ttl_seconds": _resolve_ttl(changes["ttl_seconds"])}
    return _write(
        context_id=context_id, writer=writer, expected_version=expected_version, changes=changes
    )


@_audits_refusals
def context_create(
    *,
    owner: Agent,
    context_type: str,
    payload,
    tags=(),
    ttl_seconds=UNSET,
    key: str | None = None,
    expected_version: int | None = None,
    create_only: bool = False,
) -> tuple[ContextEntry, bool]:
    """Create an entry owned by `owner`; with a key, upsert the owner's entry of that key.

    Answer (entry, created). For a keyed write, `expected_version` (If-Match) updates only that
    version and `create_only` (If-None-Match: *) creates only when the key is free; with neither,
    the write replaces whatever version is current (last writer wins, each as a new version).
    """
    if context_type not in CONTEXT_TYPES:
        raise ContextInvalid(f"context_type: must be one of {', '.join(CONTEXT_TYPES)}.")
    _require(owner, context_type, WRITE)
    payload_check(payload)
    tags = _clean_tags(tags)
    ttl_seconds = _resolve_ttl(ttl_seconds)
    fields = {
        "context_type": context_type,
        "payload": payload,
        "tags": tags,
        "ttl_seconds": ttl_seconds,
    }
    if key is None:
        return _insert(owner=owner, key=None, now=timezone.now(), **fields), True
    for _attempt in range(UPSERT_ATTEMPTS):
        now = timezone.now()
        existing = ContextEntry.objects.select_related("owner").filter(owner=owner, key=key).first()
        if existing is not None and existing.is_expired(now):
            # Expired but not yet purged: it is gone as far as anyone can see, so the key is free.
            _delete_announced([existing], event="expired")
            existing = None
        if existing is None:
            if expected_version is not None:
                raise VersionMismatch(None, f"No entry has key {key!r}; If-Match cannot match.")
            try:
                return _insert(owner=owner, key=key, now=now, **fields), True
            except IntegrityError:
                continue  # a concurrent upsert took the key: go again as an update
        if create_only:
            raise VersionMismatch(
                existing.version, f"Key {key!r} is taken (version {existing.version})."
            )
        if existing.context_type != context_type:
            raise ContextConflict(
                f"context_type: key {key!r} holds a {existing.context_type} entry; "
                "an entry's type never changes."
            )
        try:
            entry = _write(
                context_id=existing.pk,
                writer=owner,
                expected_version=existing.version if expected_version is None else expected_version,
                changes=fields,
            )
        except (VersionMismatch, ContextNotFound):
            if expected_version is not None:
                raise
            continue  # another writer moved it between our read and write: read again
        return entry, False
    raise ContextConflict(f"Key {key!r} is being written concurrently; retry.")


def _delete_announced(entries: list[ContextEntry], *, event: str) -> int:
    """Delete entries (their tags and history go with them) and announce each after commit."""
    if not entries:
        return 0
    changes = [(event, entry.as_dict()) for entry in entries]
    with transaction.atomic():
        _, counts = ContextEntry.objects.filter(pk__in=[e.pk for e in entries]).delete()
        deleted = counts.get(ContextEntry._meta.label, 0)
        # Nothing deleted: someone else removed them first, and announced it.
        if deleted:
            _announce_on_commit(changes)
    return deleted


@_audits_refusals
def context_delete(
    *,
    context_id,
    agent: Agent | None = None,
    operator: bool = False,
    expected_version: int | None = None,
    actor=None,
) -> None:
    """Delete an entry: its owner may, and so may an operator (agent None, operator True).

    `actor` is the operator's user, named in the audit log.
    """
    with transaction.atomic():
        entry = ContextEntry.objects.live().select_related("owner").filter(pk=context_id).first()
        if entry is None:
            raise ContextNotFound("No such context entry (or it has expired).")
        if agent is not None:
            if entry.owner_id != agent.pk:
                _refuse_not_owner(
                    agent, entry, "Only the owner (or an operator) may delete an entry."
                )
            _require(agent, entry.context_type, WRITE, entry.pk)
        elif not operator:
            raise ContextForbidden("Only the owner (or an operator) may delete an entry.")
        if expected_version is not None and entry.version != expected_version:
            raise VersionMismatch(entry.version)
        changes = [("deleted", entry.as_dict())]
        # Conditional like updates: a write that slipped in first turns this into 412.
        _, counts = ContextEntry.objects.filter(pk=entry.pk, version=entry.version).delete()
        if not counts.get(ContextEntry._meta.label, 0):
            current = (
                ContextEntry.objects.live()
                .filter(pk=entry.pk)
                .values_list("version", flat=True)
                .first()
            )
            if current is None:
                raise ContextNotFound("No such context entry (or it has expired).")
            raise VersionMismatch(current)
        if agent is None:
            audit_record(
                actor=actor,
                action="context_deleted",
                target=str(entry.pk),
                detail={"context_type": entry.context_type, "owner": entry.owner.agent_id},
            )
        _announce_on_commit(changes)


def contexts_delete_by_operator(*, entries, actor=None) -> int:
    """Delete the given entries (an admin action) and announce each deletion."""
    entries = list(entries.select_related("owner"))
    deleted = _delete_announced(entries, event="deleted")
    if deleted:
        audit_record(
            actor=actor,
            action="contexts_deleted",
            target=f"{deleted} entries" if deleted != 1 else str(entries[0].pk),
            detail={"context_ids": [str(e.pk) for e in entries[:100]]},
        )
    return deleted


def contexts_purge_expired(*, batch_size: int | None = None, max_batches: int | None = None) -> int:
    """Delete expired entries in batches, oldest expiry first, announcing each as expired.

    Rows another purger holds are skipped (PostgreSQL), so concurrent purges never announce an
    entry twice. Readers never see expired entries anyway; this reclaims their space.
    """
    batch_size = batch_size or _hub()["CONTEXT_PURGE_BATCH"]
    purged = batches = 0
    while max_batches is None or batches < max_batches:
        with transaction.atomic():
            batch = list(
                ContextEntry.objects.expired()
                .select_related("owner")
                .select_for_update(skip_locked=True, of=("self",))
                .order_by("expires_at")[:batch_size]
            )
            purged += _delete_announced(batch, event="expired")
        batches += 1
        if len(batch) < batch_size:
            break
    if purged:
        audit_record(action="expired_contexts_purged", target=f"{purged} entries")
        logger.info("purged expired context entries", extra={"count": purged})
    return purged


# --- Reads --------------------------------------------------------------------------------------


@_audits_refusals
def context_get(*, context_id, reader: Agent | None) -> ContextEntry:
    """Return a live entry the reader may read (reader None: an operator)."""
    entry = ContextEntry.objects.live().select_related("owner").filter(pk=context_id).first()
    if entry is None:
        raise ContextNotFound("No such context entry (or it has expired).")
    _require(reader, entry.context_type, READ, entry.pk)
    return entry


@_audits_refusals
def context_versions(*, context_id, reader: Agent | None) -> tuple[ContextEntry, list[dict]]:
    """Return the entry and its last CONTEXT_HISTORY versions, newest (the current one) first."""
    entry = context_get(context_id=context_id, reader=reader)
    history = _hub()["CONTEXT_HISTORY"]
    current = {
        "version": entry.version,
        "payload": entry.payload,
        "tags": list(entry.tags),
        "ttl_seconds": entry.ttl_seconds,
        "updated_at": entry.as_dict()["updated_at"],
    }
    earlier = entry.versions.filter(version__gt=entry.version - history).order_by("-version")
    return entry, [current] + [row.as_dict() for row in earlier[: history - 1]]


@_audits_refusals
def context_version(*, context_id, reader: Agent | None, version: int) -> dict:
    entry, versions = context_versions(context_id=context_id, reader=reader)
    for row in versions:
        if row["version"] == version:
            return row
    raise ContextNotFound(
        f"Version {version} of this entry is not kept (it is at version {entry.version})."
    )


# --- Queries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Where a walk stopped: the last (updated_at, context_id) sent, and the first page's count."""

    updated_at: datetime
    context_id: uuid.UUID
    count: int
    count_exact: bool

    def encode(self) -> str:
        raw = orjson.dumps(
            [self.updated_at.isoformat(), str(self.context_id), self.count, self.count_exact]
        )
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> "Cursor":
        """Parse a cursor made by encode(); raise ValueError for anything else."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            updated_at, context_id, count, count_exact = orjson.loads(raw)
            moment = datetime.fromisoformat(updated_at)
            if (
                timezone.is_naive(moment)
                or not isinstance(count, int)
                or not isinstance(count_exact, bool)
            ):
                raise ValueError
            return cls(moment, uuid.UUID(context_id), count, count_exact)
        except (binascii.Error, orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
            raise ValueError("not a cursor from this API") from None


# What ContextEntry.as_dict reads: every column of the entry and its owner's agent_id.
PAGE_FIELDS = (
    "context_type",
    "key",
    "payload",
    "tags",
    "version",
    "ttl_seconds",
    "created_at",
    "updated_at",
    "expires_at",
    "owner__agent_id",
)


@dataclass(frozen=True)
class Page:
    results: list[ContextEntry]
    next_cursor: str | None
    count: int
    count_exact: bool


@_audits_refusals
def contexts_query(
    *,
    reader: Agent | None,
    agent_id: str | None = None,
    context_type: str | None = None,
    tags=(),
    since: datetime | None = None,
    key: str | None = None,
    limit: int = 100,
    cursor: Cursor | None = None,
) -> Page:
    """Return one page of live entries matching every filter, newest write first.

    Walk on with `next_cursor`: keyset pagination on (updated_at, context_id), so entries written
    during a walk never shift a page. An entry updated during a walk moves to the front, past the
    cursor; a client that must see every change walks again with `since`. `count` is exact up to
    CONTEXT_COUNT_CAP and fixed at the first page, so deep walks pay for it once.
    """
    now = timezone.now()
    types = context_types_readable(agent=reader, context_type=context_type)
    if agent_id is not None:
        owner_pk = Agent.objects.filter(agent_id=agent_id).values_list("pk", flat=True).first()
        if owner_pk is None:
            return Page([], None, 0, True)
    tags = _clean_tags(tags)
    live = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
    # A tag is usually rarer than a type, so ?tag= (with or without a type) reads the tag rows,
    # which copy every column it filters on; with an owner or a key the entry indexes are
    # narrower still.
    by_tag = bool(tags) and agent_id is None and key is None
    if by_tag:
        rows = ContextTag.objects.filter(live, tag=tags[0])
        entry, ident, extra_tags = "entry__", "entry_id", tags[1:]
    else:
        rows = ContextEntry.objects.filter(live)
        entry, ident, extra_tags = "", "id", tags
        if agent_id is not None:
            rows = rows.filter(owner_id=owner_pk)
        if key is not None:
            rows = rows.filter(key=key)
    moment = "updated_at"
    if context_type is not None:
        rows = rows.filter(context_type=context_type)
    elif len(types) < len(CONTEXT_TYPES):
        rows = rows.filter(context_type__in=types)
    if since is not None:
        rows = rows.filter(updated_at__gte=since)
    for tag in extra_tags:
        rows = rows.filter(
            **{f"{ident}__in": ContextTag.objects.filter(tag=tag).values("entry_id")}
        )
    rows = rows.order_by(f"-{moment}", f"-{ident}")
    if cursor is None:
        cap = _hub()["CONTEXT_COUNT_CAP"]
        # Any cap + 1 matches prove "more than cap", so the count needs no order.
        counted = rows.order_by()[: cap + 1].count()
        count, count_exact = min(counted, cap), counted <= cap
    else:
        count, count_exact = cursor.count, cursor.count_exact
        # The first term bounds the index range; the second breaks ties at the same instant.
        rows = rows.filter(
            Q(**{f"{moment}__lt": cursor.updated_at})
            | Q(**{moment: cursor.updated_at, f"{ident}__lt": cursor.context_id}),
            **{f"{moment}__lte": cursor.updated_at},
        )
    # Of the owner only its agent_id is shown; loading the rest would cost more than the query.
    columns = [f"{entry}{name}" for name in PAGE_FIELDS]
    if by_tag:
        columns += ["updated_at", "entry"]
    rows = list(rows.select_related(f"{entry}owner").only(*columns)[: limit + 1])
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        # The cursor holds the sort key of the rows walked (tag rows or entries).
        last = rows[-1]
        next_cursor = Cursor(
            getattr(last, moment), getattr(last, ident), count, count_exact
        ).encode()
    page = [row.entry for row in rows] if by_tag else rows
    return Page(page, next_cursor, count, count_exact)
