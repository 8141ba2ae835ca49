"""The group-commit writer: many sockets' sends, acks and delivered marks in one transaction.

`write_batch` runs in the database thread and answers each send what `services.message_send`
would. Its statements are plain SQL on the driver's own cursor: on this path building ORM
queries cost far more than the database's own work (about 1 ms per UPDATE against tens of
microseconds of SQLite time), and Django's cursor wrappers (error translation, placeholder
rewriting, query metrics) were a third of what remained in Python. Errors are still translated,
once per batch, by `connection.wrap_database_errors`. Django's per-call health check
(`CONN_HEALTH_CHECKS`, a `SELECT 1` on PostgreSQL) lives in its own cursor and is skipped: a
connection that died fails one batch, whose senders hear "storage is unavailable; retry", and
the error marks it to be replaced before the next batch.
"""

import contextvars
import json
import uuid
from contextlib import closing, contextmanager, nullcontext, suppress
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import cache, partial

import orjson
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, transaction
from django.utils import timezone

from agents.models import Agent, Connection
from agents.services import HubError
from ops import telemetry
from security.services import request_source

from . import protocol, services
from .ids import new_ids
from .models import Delivery, Mailbox, Message

PENDING = (Delivery.Status.QUEUED, Delivery.Status.DELIVERED)


@dataclass
class Outgoing:
    """One send waiting for the batch writer."""

    sender: Agent
    kind: str
    payload: object
    to: str | None = None
    topic: str | None = None
    client_id: str | None = None
    ttl: float | None = None
    source: str = ""
    # The sending socket's context (its log fields), for what is logged about the send.
    context: contextvars.Context | None = None


@dataclass
class Ack:
    """One acknowledgement waiting for the batch writer."""

    recipient_id: int
    message_ids: list | None = None
    up_to_seq: int | None = None
    # Whether the client wants to hear how many deliveries the ack settled.
    answer: bool = True


@dataclass
class BatchResult:
    # Per send, in order: Accepted, or the HubError that refused it.
    sends: list
    # Per ack, in order: how many deliveries it settled (None where nobody asked).
    acks: list
    # Message frames for each connected recipient in seq order, and its open sockets' channels.
    frames: dict[int, list[dict]]
    channels: dict[int, list[str]]


class _Statements:
    """The hot path's SQL, in the driver's own placeholder style. SQLite runs in this process, so
    executemany costs little per row; this base class is what it uses. Over a network every
    statement is a round trip, so the PostgreSQL subclass sends many rows per statement."""

    native_uuid = False
    json_cast = ""
    # Writers queue for the database's write lock at BEGIN, not at their first write.
    begin = "BEGIN IMMEDIATE"
    # sqlite3 takes qmark placeholders; psycopg takes %s.
    placeholder = "?"

    def __init__(self):
        p = self.placeholder
        quote = connection.ops.quote_name
        self.message, self.delivery = quote(Message._meta.db_table), quote(Delivery._meta.db_table)
        self.mailbox, agent = quote(Mailbox._meta.db_table), quote(Agent._meta.db_table)
        connection_table = quote(Connection._meta.db_table)
        self.pending = f"status IN ('{PENDING[0]}', '{PENDING[1]}')"
        self.message_head = (
            f"INSERT INTO {self.message} (id, sender_id, kind, topic, payload, client_id,"
            " recipient_count, created_at, expires_at) VALUES "
        )
        self.message_row = f"({p}, {p}, {p}, {p}, {p}{self.json_cast}, {p}, {p}, {p}, {p})"
        self.delivery_head = (
            f"INSERT INTO {self.delivery} (message_id, recipient_id, seq, status, attempts,"
            " expires_at) VALUES "
        )
        self.delivery_row = f"({p}, {p}, {p}, {p}, 0, {p})"
        self.bump_mailbox = (
            f"UPDATE {self.mailbox} SET last_seq = last_seq + {p} WHERE agent_id = {p}"
        )
        self.create_mailbox = (
            f"INSERT INTO {self.mailbox} (agent_id, last_seq) VALUES ({p}, 0)"
            " ON CONFLICT DO NOTHING"
        )
        self.read_mailboxes = f"SELECT agent_id, last_seq FROM {self.mailbox} WHERE agent_id IN ("
        self.active_agents = (
            f"SELECT agent_id, id FROM {agent} WHERE state = '{Agent.State.ACTIVE}'"
            " AND agent_id IN ("
        )
        self.open_channels = (
            f"SELECT agent_id, channel_name FROM {connection_table}"
            " WHERE closed_at IS NULL AND agent_id IN ("
        )
        self.client_ids = (
            f"SELECT client_id FROM {self.message} WHERE sender_id = {p}"
            " AND client_id IS NOT NULL AND client_id IN ("
        )
        self.ack_up_to = (
            f"UPDATE {self.delivery} SET status = '{Delivery.Status.ACKED}', acked_at = {p}"
            f" WHERE recipient_id = {p} AND seq <= {p} AND {self.pending}"
        )
        self.ack_ids = (
            f"UPDATE {self.delivery} SET status = '{Delivery.Status.ACKED}', acked_at = {p}"
            f" WHERE recipient_id = {p} AND {self.pending} AND message_id IN ("
        )
        self.touch_connections = f"UPDATE {connection_table} SET last_seen_at = {p} WHERE id IN ("
        self.touch_agents = f"UPDATE {agent} SET last_seen_at = {p} WHERE id IN ("
        self.mark_delivered = (
            f"UPDATE {self.delivery} SET status = '{Delivery.Status.DELIVERED}',"
            f" delivered_at = {p}, attempts = attempts + 1"
            f" WHERE recipient_id = {p} AND seq = {p} AND {self.pending}"
        )

    def placeholders(self, count: int) -> str:
        return ", ".join([self.placeholder] * count)

    def uuid(self, value: uuid.UUID):
        return value if self.native_uuid else value.hex

    def insert_messages(self, cursor, rows) -> None:
        cursor.executemany(self.message_head + self.message_row, rows)

    def insert_deliveries(self, cursor, rows) -> None:
        cursor.executemany(self.delivery_head + self.delivery_row, rows)

    def pipeline(self, cursor):
        """Where statements go out without waiting for each one's answer (PostgreSQL)."""
        return nullcontext()

    def bump_mailboxes(self, cursor, counts: dict[int, int], ids: list[int]) -> list:
        """Add counts[r] to each existing mailbox in `ids`; `_rows` of the cursors returned gives
        their (agent_id, new last seq)."""
        cursor.executemany(self.bump_mailbox, [(counts[agent_id], agent_id) for agent_id in ids])
        return _query_in(cursor, self, self.read_mailboxes, ids)

    def ack_silently(self, cursor, now, rows) -> None:
        """Apply (recipient_id, up_to_seq) acks nobody waits to hear about."""
        cursor.executemany(self.ack_up_to, [(now, *row) for row in rows])

    def mark(self, cursor, now, rows) -> None:
        """Record (recipient_id, seq) frames as written to a socket."""
        cursor.executemany(self.mark_delivered, [(now, *row) for row in rows])


class _PostgresStatements(_Statements):
    native_uuid = True
    json_cast = "::jsonb"
    begin = "BEGIN"
    placeholder = "%s"

    def pipeline(self, cursor):
        """psycopg's pipeline mode: a batch's statements cost a round trip where a result is
        read, not one each."""
        return cursor.connection.pipeline()

    def _many(self, cursor, head, row, rows, tail="", before=(), *, results=False) -> list:
        """Run a statement over `rows` in chunks; with `results`, each on a cursor of its own,
        returned for `_rows`."""
        cursors = []
        for chunk in services.chunks(rows):
            params = [*before]
            for values in chunk:
                params.extend(values)
            statement = head + ", ".join([row] * len(chunk)) + tail
            if results:
                cursors.append(_execute(cursor, statement, params))
            else:
                cursor.execute(statement, params)
        return cursors

    def insert_messages(self, cursor, rows) -> None:
        self._many(cursor, self.message_head, self.message_row, rows)

    def insert_deliveries(self, cursor, rows) -> None:
        self._many(cursor, self.delivery_head, self.delivery_row, rows)

    def bump_mailboxes(self, cursor, counts, ids):
        # Lock in recipient order first: every writer does, so none waits on another in a cycle.
        for chunk in services.chunks(ids):
            cursor.execute(
                f"SELECT agent_id FROM {self.mailbox} WHERE agent_id IN"
                f" ({self.placeholders(len(chunk))}) ORDER BY agent_id FOR UPDATE",
                chunk,
            )
        return self._many(
            cursor,
            f"UPDATE {self.mailbox} AS m SET last_seq = m.last_seq + v.n FROM (VALUES ",
            "(%s, %s)",
            [(agent_id, counts[agent_id]) for agent_id in ids],
            ") AS v (agent_id, n) WHERE m.agent_id = v.agent_id RETURNING m.agent_id, m.last_seq",
            results=True,
        )

    def ack_silently(self, cursor, now, rows) -> None:
        self._many(
            cursor,
            f"UPDATE {self.delivery} AS d SET status = '{Delivery.Status.ACKED}', acked_at = %s"
            " FROM (VALUES ",
            "(%s, %s)",
            rows,
            ") AS v (recipient_id, up_to) WHERE d.recipient_id = v.recipient_id"
            f" AND d.seq <= v.up_to AND d.{self.pending}",
            before=(now,),
        )

    def mark(self, cursor, now, rows) -> None:
        self._many(
            cursor,
            f"UPDATE {self.delivery} AS d SET status = '{Delivery.Status.DELIVERED}',"
            " delivered_at = %s, attempts = d.attempts + 1 FROM (VALUES ",
            "(%s, %s)",
            rows,
            ") AS v (recipient_id, seq) WHERE d.recipient_id = v.recipient_id"
            f" AND d.seq = v.seq AND d.{self.pending}",
            before=(now,),
        )


@cache
def _statements(vendor: str) -> _Statements:
    return _PostgresStatements() if vendor == "postgresql" else _Statements()


def _execute(cursor, statement: str, params):
    """Run a statement on a cursor of its own, whose result is read later (`_rows`, rowcount):
    in a pipeline, reading a result is what waits for the database."""
    own = cursor.connection.cursor()
    own.execute(statement, params)
    return own


def _rows(cursors) -> list[tuple]:
    rows = []
    for each in cursors:
        rows += each.fetchall()
        each.close()
    return rows


def _query_in(cursor, sql: _Statements, head: str, values, before=()) -> list:
    """`head` over `values`, a statement per chunk; `_rows` of the cursors returned reads them."""
    return [
        _execute(cursor, head + sql.placeholders(len(chunk)) + ")", (*before, *chunk))
        for chunk in services.chunks(list(values))
    ]


def _select_in(cursor, sql: _Statements, head: str, values, before=()) -> list[tuple]:
    return _rows(_query_in(cursor, sql, head, values, before))


@contextmanager
def _transaction(db, cursor, sql: _Statements):
    """One transaction on the driver's cursor, rolled back on any error; on PostgreSQL in a
    pipeline, from BEGIN to COMMIT.

    Django's atomic() cost about 50 µs of CPU a batch here (its bookkeeping, and a Django cursor
    built for each BEGIN): a batch of one send, one ack and one mark on SQLite took 187 µs with
    it and 128-140 µs without. Inside a caller's atomic block (tests) this is a savepoint of
    Django's instead."""
    if db.in_atomic_block:
        with transaction.atomic(using=db.alias):
            yield
        return
    try:
        with sql.pipeline(cursor):
            cursor.execute(sql.begin)
            yield
            _commit(cursor)
    except BaseException:
        with suppress(Exception):  # a connection that died: its error is the one that counts
            cursor.execute("ROLLBACK")
        raise


def _commit(cursor) -> None:
    cursor.execute("COMMIT")


@contextmanager
def _driver_cursor(db):
    """The database driver's own cursor on Django's connection `db`, its errors Django's."""
    db.ensure_connection()
    with db.wrap_database_errors, closing(db.connection.cursor()) as cursor:
        yield cursor


def _json(payload) -> str:
    try:
        return orjson.dumps(payload).decode()
    except TypeError:  # an integer beyond 64 bits, say
        return json.dumps(payload)


# --- Deciding what to store -----------------------------------------------------------------------


def _known_duplicates(cursor, sql: _Statements, sends: list[Outgoing], results: list) -> None:
    """Answer sends whose client id an earlier, committed message already has."""
    wanted: dict[int, set[str]] = {}
    for send in sends:
        if send.client_id is not None:
            wanted.setdefault(send.sender.pk, set()).add(send.client_id)
    existing = set()
    for sender_pk, client_ids in wanted.items():
        for (client_id,) in _select_in(
            cursor, sql, sql.client_ids, sorted(client_ids), (sender_pk,)
        ):
            existing.add((sender_pk, client_id))
    if not existing:
        return
    for index, send in enumerate(sends):
        if (send.sender.pk, send.client_id) in existing:
            results[index] = services.duplicate_of(send.sender, send.client_id)


def _resolve(
    cursor, sql: _Statements, sends: list[Outgoing], results: list
) -> dict[int, list[int]]:
    """Check each send not answered yet; return the recipients of each one to store.

    Refusals (policy, unknown recipient) are answered in `results`; a repeat of a client id
    within the batch gets the index of its first send, settled after the commit.
    """
    direct_kinds = (Message.Kind.DIRECT, Message.Kind.REQUEST)
    names = {
        send.to
        for send, result in zip(sends, results, strict=True)
        if result is None and send.kind in direct_kinds
    }
    direct = dict(_select_in(cursor, sql, sql.active_agents, sorted(names))) if names else {}
    first_of: dict[tuple[int, str], int] = {}
    recipients: dict[int, list[int]] = {}
    for index, send in enumerate(sends):
        if results[index] is not None:
            continue
        if send.client_id is not None:
            key = (send.sender.pk, send.client_id)
            if key in first_of:
                results[index] = first_of[key]
                continue
            first_of[key] = index
        request_source.set(send.source)
        try:
            services.authorize_send(
                sender=send.sender, kind=send.kind, to=send.to, topic=send.topic
            )
            if send.kind in direct_kinds:
                if send.to not in direct:
                    raise services.UnknownRecipient(f"No active agent {send.to!r}.")
                recipients[index] = [direct[send.to]]
            else:
                recipients[index] = services.recipients_of(
                    sender=send.sender, kind=send.kind, to=send.to, topic=send.topic
                )
        except HubError as exc:
            results[index] = exc
    return recipients


# --- Storing -------------------------------------------------------------------------------------


def _reserve_seqs(cursor, sql: _Statements, counts: dict[int, int]):
    """Reserve counts[r] numbers in each recipient's mailbox; return the last of each, and the
    open sockets' channel names of each recipient.

    Mailbox rows stay locked until commit, so per-recipient commit order equals seq order
    (SQLite's writer holds the whole database). The sockets are read after the lock: one that
    opens later reads this batch's messages with its backlog once the commit is done.
    """
    ids = sorted(counts)
    bumped = sql.bump_mailboxes(cursor, counts, ids)
    sockets = _query_in(cursor, sql, sql.open_channels, ids)
    last = dict(_rows(bumped))
    missing = [agent_id for agent_id in ids if agent_id not in last]
    if missing:  # a recipient's first message
        cursor.executemany(sql.create_mailbox, [(agent_id,) for agent_id in missing])
        last.update(_rows(sql.bump_mailboxes(cursor, counts, missing)))
        _rows(sockets)
        sockets = _query_in(cursor, sql, sql.open_channels, ids)
    channels: dict[int, list[str]] = {}
    for agent_id, channel_name in _rows(sockets):
        channels.setdefault(agent_id, []).append(channel_name)
    return last, channels


def _store(db, cursor, sql: _Statements, sends, recipients, results, frames) -> dict:
    """Insert the messages and deliveries of `recipients`; fill `results` and `frames`; return
    the recipients' open sockets' channel names."""
    now = timezone.now()
    adapt = db.ops.adapt_datetimefield_value
    stored_now = adapt(now)
    message_rows, counts, ids, expiries = [], {}, {}, {}
    for (index, recipient_ids), message_id in zip(
        recipients.items(), new_ids(len(recipients)), strict=True
    ):
        send = sends[index]
        ids[index] = message_id
        expires_at = now + timedelta(seconds=send.ttl) if send.ttl else None
        expiries[index] = adapt(expires_at)
        message_rows.append(
            (
                sql.uuid(message_id),
                send.sender.pk,
                send.kind,
                send.topic or "",
                _json(send.payload),
                send.client_id,
                len(recipient_ids),
                stored_now,
                expiries[index],
            )
        )
        for recipient_id in recipient_ids:
            counts[recipient_id] = counts.get(recipient_id, 0) + 1
    sql.insert_messages(cursor, message_rows)
    last, channels = _reserve_seqs(cursor, sql, counts)
    # Hand out each recipient's reserved numbers in batch order.
    next_seq = {recipient_id: last[recipient_id] - n + 1 for recipient_id, n in counts.items()}
    delivery_rows = []
    for index, recipient_ids in recipients.items():
        send, message_id = sends[index], ids[index]
        stored_id = sql.uuid(message_id)
        connected = 0
        for recipient_id in recipient_ids:
            seq = next_seq[recipient_id]
            next_seq[recipient_id] = seq + 1
            delivery_rows.append(
                (stored_id, recipient_id, seq, Delivery.Status.QUEUED.value, expiries[index])
            )
            if recipient_id in channels:
                connected += 1
                frames.setdefault(recipient_id, []).append(
                    protocol.message_frame(
                        message_id=message_id,
                        seq=seq,
                        kind=send.kind,
                        sender=send.sender.agent_id,
                        payload=send.payload,
                        sent_at=now,
                        topic=send.topic or "",
                    )
                )
        status = "delivered" if connected == len(recipient_ids) else "queued"
        results[index] = services.Accepted(
            message_id, status, len(recipient_ids), False, tuple(recipient_ids)
        )
    sql.insert_deliveries(cursor, delivery_rows)
    return channels


def _settle_acks(cursor, sql: _Statements, acks: list[Ack], now) -> list[list | None]:
    """Apply the acks. Where the client asked what an ack settled, its statements' cursors,
    whose row counts say it once the transaction is done (`_counts`); None for the others."""
    settling: list[list | None] = []
    silent = []
    for ack in acks:
        if ack.up_to_seq is not None and not ack.answer:
            silent.append((ack.recipient_id, ack.up_to_seq))
            settling.append(None)
        elif ack.up_to_seq is not None:
            settling.append(
                [_execute(cursor, sql.ack_up_to, (now, ack.recipient_id, ack.up_to_seq))]
            )
        else:
            ids = [sql.uuid(value) for value in ack.message_ids]
            settling.append(
                _query_in(cursor, sql, sql.ack_ids, ids, before=(now, ack.recipient_id))
            )
    if silent:
        sql.ack_silently(cursor, now, silent)
    return settling


def _counts(settling: list[list | None]) -> list[int | None]:
    counts: list[int | None] = []
    for cursors in settling:
        if cursors is None:
            counts.append(None)
            continue
        counts.append(sum(each.rowcount for each in cursors))
        for each in cursors:
            each.close()
    return counts


def _mark_delivered(cursor, sql: _Statements, marks: dict[int, list[int]], now) -> None:
    rows = [(recipient_id, seq) for recipient_id, seqs in marks.items() for seq in seqs]
    if rows:
        sql.mark(cursor, now, rows)


def _touch(cursor, sql: _Statements, touches: dict[int, int], now) -> None:
    """Record that these connections (and their agents) showed signs of life."""
    for head, ids in (
        (sql.touch_connections, sorted(touches)),
        (sql.touch_agents, sorted(set(touches.values()))),
    ):
        for chunk in services.chunks(ids):
            cursor.execute(head + sql.placeholders(len(chunk)) + ")", (now, *chunk))


def write_batch(
    sends: list[Outgoing],
    acks: list[Ack],
    marks: dict[int, list[int]],
    touches: dict[int, int] | None = None,
) -> BatchResult:
    """Store many sends, acks, delivered marks and liveness touches (connection id: agent id)
    in one transaction (group commit).

    A refusal stays with its send; a repeated client id answers the first message. A unique-
    constraint race with another process (one client id sent through two servers at once) falls
    back to storing the sends one by one.
    """
    # Django's `connection` is a proxy that looks the thread's connection up on every use
    # (about 4 µs each here); the batch looks it up once.
    db = connections[DEFAULT_DB_ALIAS]
    sql = _statements(db.vendor)
    results: list = [None] * len(sends)
    frames: dict[int, list[dict]] = {}
    with _driver_cursor(db) as cursor:
        _known_duplicates(cursor, sql, sends, results)
        # Refusals are audited outside the batch's transaction, which they must not abort.
        recipients = _resolve(cursor, sql, sends, results)
        try:
            with db.wrap_database_errors, _transaction(db, cursor, sql):
                channels = (
                    _store(db, cursor, sql, sends, recipients, results, frames)
                    if recipients
                    else {}
                )
                now = db.ops.adapt_datetimefield_value(timezone.now())
                settling = _settle_acks(cursor, sql, acks, now)
                if marks:
                    _mark_delivered(cursor, sql, marks, now)
                if touches:
                    _touch(cursor, sql, touches, now)
        except IntegrityError:
            return _write_one_by_one(sends, acks, marks, touches)
        acked = _counts(settling)
    for index, result in enumerate(results):
        if isinstance(result, int):  # a repeat, within this batch, of an earlier send's id
            first = results[result]
            results[index] = (
                replace(first, duplicate=True, recipient_ids=())
                if isinstance(first, services.Accepted)
                else first
            )
    for index in recipients:
        accepted, send = results[index], sends[index]
        log = partial(
            telemetry.message_accepted,
            message_id=accepted.message_id,
            kind=send.kind,
            recipients=accepted.recipients,
        )
        if send.context is None:
            log()
        else:  # in the writer thread, with the log fields of the socket that sent it
            send.context.run(log)
    return BatchResult(results, acked, frames, channels)


def _write_one_by_one(sends, acks, marks, touches) -> BatchResult:
    results = []
    for send in sends:
        request_source.set(send.source)
        try:
            results.append(
                services.message_send(
                    sender=send.sender,
                    kind=send.kind,
                    payload=send.payload,
                    to=send.to,
                    topic=send.topic,
                    client_id=send.client_id,
                    ttl=send.ttl,
                )
            )
        except HubError as exc:
            results.append(exc)
    sql = _statements(connection.vendor)
    with transaction.atomic(), _driver_cursor(connections[DEFAULT_DB_ALIAS]) as cursor:
        now = connection.ops.adapt_datetimefield_value(timezone.now())
        acked = _counts(_settle_acks(cursor, sql, acks, now))
        _mark_delivered(cursor, sql, marks, now)
        if touches:
            _touch(cursor, sql, touches, now)
    # message_send nudged its recipients through the channel layer already.
    return BatchResult(results, acked, {}, {})
