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
from itertools import groupby
from operator import itemgetter

import orjson
import psycopg
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, transaction
from django.utils import timezone
from psycopg import generators, pq

from agents.models import Agent, Connection
from agents.services import HubError
from ops import telemetry
from security.services import request_source

from . import pg_arrays, protocol, services
from .ids import new_ids
from .models import Delivery, Mailbox, Message
from .pg_arrays import Bigints, Integers, Texts, Timestamps, Uuids

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
    # Every delivery up to this seq is settled already, as far as the engine knows: an ack up to
    # a seq reads only the deliveries after it (see `Engine.ack`).
    after_seq: int = 0
    # The highest seq the acking socket has written, which bounds what its ack can settle.
    seen_seq: int = 0
    # The engine's count of resets of what it knows settled, when the ack was queued.
    epoch: int = 0
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
    """The hot path's SQL, in the driver's own placeholder style; this base class is SQLite's.
    Over a network every statement is a round trip, so the PostgreSQL subclass sends many rows
    per statement.

    SQLite runs in this process, in the writer thread, and executemany's rows cost it little
    database time; but each row is a call into SQLite, which gives the interpreter's lock (GIL)
    to the event loop and then waits to get it back. Under load the loop holds it half the time,
    so the writer waited about as long as it worked: 17.5 ms for a batch of 290 sends, 8.5 ms of
    it on the CPU (py-spy --native: the waits are in take_gil after each statement). Rows that
    go together therefore go as one JSON array, which one statement reads with `json_each`: the
    messages, the deliveries, the mailboxes' counts, the quiet acks and the delivered marks. A
    batch of 210 sends took 10.7 ms, 5.7 of them on the CPU, and direct on SQLite (hub only,
    two alternating pairs) rose from 16,913 / 15,644 to 18,313 / 17,358 delivered/s; latency
    at 1,000/s did not move. JSON cannot carry every string SQLite can store (`json_extract`
    ends a string at an escaped NUL), so only values the protocol allows go this way: it
    refuses NUL anywhere in a frame (`protocol.parse_frame`). `UPDATE ... FROM` needs SQLite
    3.33 (messaging/checks.py).
    """

    native_uuid = False
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
        # (id, sender, kind, topic, payload, client_id, recipient_count, expires_at) rows in the
        # second parameter, all created at the first.
        self.message_rows = (
            f"INSERT INTO {self.message} (id, sender_id, kind, topic, payload, client_id,"
            f" recipient_count, created_at, expires_at) SELECT {_json_columns(7)}, ?1,"
            " json_extract(value, '$[7]') FROM json_each(?2)"
        )
        # (message_id, recipient_id, seq, expires_at) rows.
        self.delivery_rows = (
            f"INSERT INTO {self.delivery} (message_id, recipient_id, seq, status, attempts,"
            f" expires_at) SELECT {_json_columns(3)}, '{Delivery.Status.QUEUED}', 0,"
            " json_extract(value, '$[3]') FROM json_each(?)"
        )
        # (agent_id, count) rows.
        self.bump_mailboxes_rows = (
            f"UPDATE {self.mailbox} SET last_seq = last_seq + json_extract(v.value, '$[1]')"
            " FROM json_each(?) AS v WHERE agent_id = json_extract(v.value, '$[0]')"
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
            f"SELECT sender_id, client_id FROM {self.message} WHERE sender_id = {p}"
            " AND client_id IS NOT NULL AND client_id IN ("
        )
        # An ack also records the delivery its client saw, where no delivered mark did yet (the
        # engine drops the marks an ack covers): the ack's time as the delivery's, one attempt.
        # Its parameters start with the time twice.
        self.acked = (
            f"status = '{Delivery.Status.ACKED}', acked_at = {p},"
            f" delivered_at = COALESCE(delivered_at, {p}),"
            " attempts = CASE WHEN attempts = 0 THEN 1 ELSE attempts END"
        )
        self.ack_up_to = (
            f"UPDATE {self.delivery} SET {self.acked}"
            f" WHERE recipient_id = {p} AND seq > {p} AND seq <= {p} AND {self.pending}"
        )
        # (recipient_id, after_seq, up_to_seq) rows in the second parameter. A delivery that
        # several rows match is updated once.
        self.ack_rows = (
            f"UPDATE {self.delivery} SET {self.acked.replace(p, '?1')} FROM json_each(?2) AS v"
            " WHERE recipient_id = json_extract(v.value, '$[0]')"
            " AND seq > json_extract(v.value, '$[1]') AND seq <= json_extract(v.value, '$[2]')"
            f" AND {self.pending}"
        )
        self.ack_ids = (
            f"UPDATE {self.delivery} SET {self.acked}"
            f" WHERE recipient_id = {p} AND {self.pending} AND message_id IN ("
        )
        self.touch_connections = f"UPDATE {connection_table} SET last_seen_at = {p} WHERE id IN ("
        self.touch_agents = f"UPDATE {agent} SET last_seen_at = {p} WHERE id IN ("
        # (recipient_id, seq) rows in the second parameter.
        self.mark_rows = (
            f"UPDATE {self.delivery} SET status = '{Delivery.Status.DELIVERED}',"
            " delivered_at = ?1, attempts = attempts + 1 FROM json_each(?2) AS v"
            " WHERE recipient_id = json_extract(v.value, '$[0]')"
            f" AND seq = json_extract(v.value, '$[1]') AND {self.pending}"
        )

    def placeholders(self, count: int) -> str:
        return ", ".join([self.placeholder] * count)

    def uuid(self, value: uuid.UUID):
        return value if self.native_uuid else value.hex

    def cursor(self, raw):
        """The cursor a batch runs on, from the driver's connection `raw`."""
        return raw.cursor()

    def query(self, cursor, statement: str, params) -> list:
        """Run a statement whose result is read later: `_rows` of the cursors returned."""
        return [_execute(cursor, statement, params)]

    def stored_client_ids(self, cursor, pairs: list[tuple[int, str]]):
        """Look up (sender pk, client id) pairs; a callable gives those a stored message has."""
        found = []
        for sender_pk, pairs_of_sender in groupby(pairs, key=itemgetter(0)):
            found += self.client_ids_of(cursor, sender_pk, [each for _, each in pairs_of_sender])
        return lambda: _rows(found)

    def client_ids_of(self, cursor, sender_pk: int, client_ids: list[str]) -> list:
        """One sender's stored client ids among these; `_rows` of the cursors returned reads
        them as (sender pk, client id)."""
        return _query_in(cursor, self, self.client_ids, client_ids, (sender_pk,))

    def active(self, cursor, names: list[str]):
        """Look up agent ids; a callable gives the primary key of each active one."""
        found = dict(_select_in(cursor, self, self.active_agents, names))
        return lambda: found

    def remembered(self, names: list[str]) -> dict[str, int]:
        """The primary keys of these agents known from earlier batches, not looked up again but
        checked in the batch's transaction (`require_active`). SQLite's lookups cost no round
        trip; it remembers none."""
        return {}

    def require_active(self, cursor, agents: dict[str, int]) -> None:
        """In the batch's transaction: fail it with an IntegrityError unless each of these
        agents (agent id: primary key) is still active."""

    def forget(self) -> None:
        """Drop the agents remembered (one of them is no longer active)."""

    def insert_messages(self, cursor, rows, created_at) -> None:
        """Insert (id, sender, kind, topic, payload, client_id, recipient_count, expires_at)
        rows, all created at `created_at`."""
        cursor.execute(self.message_rows, (created_at, orjson.dumps(rows)))

    def store(self, cursor, counts: dict[int, int], deliveries: list[tuple]):
        """Reserve counts[r] numbers in each recipient's mailbox and insert the deliveries,
        (message_id, recipient_id, back, expires_at) rows whose seq is `back` before the
        recipient's new last seq. Returns two callables, for once the batch is committed: the
        new last seq of each recipient, and the (agent_id, channel_name) rows of their open
        sockets.

        Mailbox rows stay locked until commit, so per-recipient commit order equals seq order
        (SQLite's writer holds the whole database). The sockets are read after the lock: one
        that opens later reads this batch's messages with its backlog once the commit is done.
        """
        ids = sorted(counts)
        last = dict(_rows(self.bump_mailboxes(cursor, counts, ids)))
        missing = [agent_id for agent_id in ids if agent_id not in last]
        if missing:  # a recipient's first message
            cursor.executemany(self.create_mailbox, [(agent_id,) for agent_id in missing])
            last.update(_rows(self.bump_mailboxes(cursor, counts, missing)))
        rows = [
            (message_id, recipient_id, last[recipient_id] - back, expires_at)
            for message_id, recipient_id, back, expires_at in deliveries
        ]
        cursor.execute(self.delivery_rows, (orjson.dumps(rows),))
        sockets = _select_in(cursor, self, self.open_channels, ids)
        return lambda: last, lambda: sockets

    def pipeline(self, cursor):
        """Where statements go out without waiting for each one's answer (PostgreSQL)."""
        return nullcontext()

    def gathering(self, cursor):
        """Where the batch's writes are gathered, to be sent together at its end (PostgreSQL);
        inside a transaction of the caller's."""
        return nullcontext()

    @contextmanager
    def transaction(self, cursor):
        """The batch's transaction, rolled back on any error."""
        try:
            cursor.execute(self.begin)
            yield
            _commit(cursor)
        except BaseException:
            with suppress(Exception):  # a connection that died: its error is the one that counts
                cursor.execute("ROLLBACK")
            raise

    def bump_mailboxes(self, cursor, counts: dict[int, int], ids: list[int]) -> list:
        """Add counts[r] to each existing mailbox in `ids`; `_rows` of the cursors returned gives
        their (agent_id, new last seq)."""
        rows = [(agent_id, counts[agent_id]) for agent_id in ids]
        cursor.execute(self.bump_mailboxes_rows, (orjson.dumps(rows),))
        return _query_in(cursor, self, self.read_mailboxes, ids)

    def settle_up_to(self, cursor, now, recipient_id: int, after_seq: int, up_to_seq: int) -> list:
        """Ack a recipient's deliveries after one seq up to another; the cursors' row counts
        say how many."""
        return self.query(cursor, self.ack_up_to, (now, now, recipient_id, after_seq, up_to_seq))

    def settle_ids(self, cursor, now, recipient_id: int, ids: list) -> list:
        """Ack a recipient's deliveries of these messages; the cursors' row counts say how many."""
        return _query_in(cursor, self, self.ack_ids, ids, before=(now, now, recipient_id))

    def ack_silently(self, cursor, now, rows) -> None:
        """Apply (recipient_id, after_seq, up_to_seq) acks nobody waits to hear about."""
        cursor.execute(self.ack_rows, (now, orjson.dumps(rows)))

    def mark(self, cursor, now, rows) -> None:
        """Record (recipient_id, seq) frames as written to a socket."""
        cursor.execute(self.mark_rows, (now, orjson.dumps(rows)))

    def touch(self, cursor, now, connection_ids: list[int], agent_ids: list[int]) -> None:
        """Record that these connections and agents showed signs of life."""
        for head, ids in (
            (self.touch_connections, connection_ids),
            (self.touch_agents, agent_ids),
        ):
            for chunk in services.chunks(ids):
                cursor.execute(head + self.placeholders(len(chunk)) + ")", (now, *chunk))


class _PostgresStatements(_Statements):
    """A batch's writes in one statement, a call of `hub_write_batch` (messaging migration
    0004) over array parameters, prepared once per connection; the lookups before it are fixed
    texts over arrays as well.

    With a statement text per batch size and Django's client-side binding, PostgreSQL parsed and
    planned every statement of every batch: 1.7 ms of its CPU for a batch of four sends, four
    acks and four marks, against 0.1 ms of execution (EXPLAIN ANALYZE of each). A statement per
    array (`unnest`, `= ANY`) has one text whatever the batch holds, so the server prepares it
    once and reuses its plan. Those were still eight or more statements a batch (BEGIN, the
    messages, the deliveries, the open sockets, an ack or a mark each, the touches, COMMIT),
    each with psycopg's work and the server's own (parse, bind, execute); as one call, a batch
    of three sends and two acks took 1.07-1.14 ms of the writer's time instead of 1.8-2.1 ms,
    0.49-0.59 ms of its CPU instead of 1.0-1.1 ms (`write_batch` alone, 1,500 batches). One
    statement is its own transaction: nothing of it stays if any part fails.

    The function acks and marks a few deliveries (`keyed_acks`, `keyed_rows` or fewer) a
    statement each, keyed on the recipient, and the lookups of names and client ids are a keyed
    subquery per value. A generic plan is made once, when the writer first runs a statement,
    often on tables still nearly empty: for the join of the arrays with the deliveries it was a
    hash join over every entry of `delivery_pending_idx`, which until a vacuum keeps one for
    each delivery ever pending. After 40,000 messages an ack for five recipients read 40,005
    entries (4.4 ms of the database's time, EXPLAIN ANALYZE), and a batch's share of
    PostgreSQL's CPU grew from 1.3 to 3.8 ms over 8,000 batches; keyed, each statement is an
    index scan of its recipient whatever the statistics. Many go in one statement over arrays,
    the join, whose cost is spread over the batch. Naming the recipients to the table as well
    (`recipient_id = ANY(...)`) made the planner loop over the array inside an index scan of the
    recipients: one fan-out batch of marks took 4.8 s. Acks up to a seq read only the deliveries
    after the seq the engine knows settled (messaging migration 0006), keyed or joined.

    The arrays travel in PostgreSQL's binary format (`%b`): psycopg writes the text format of
    an array in Python, quoting and escaping element by element, which took 3.4 ms for the
    payloads of 300 sends, 1.2 ms for their expiry times and 0.5 ms for their ids; the binary
    format of each took 57-74 µs."""

    native_uuid = True
    placeholder = "%s"
    # Only the statements run with prepare=True are prepared; Django's cursors on the same
    # connection bind on the client and are never prepared.
    prepare_threshold = 2**31
    # Delivered marks up to this many go a statement each in the function (see above).
    keyed_rows = 32
    # Quiet acks up to this many go a statement each; more, one statement over arrays. A batch of
    # direct sends carries 30-50 (bench direct); one of broadcasts to 1,000 agents, hundreds,
    # each a statement cost fan-out on PostgreSQL 13% of its broadcasts a second.
    keyed_acks = 100
    # Agents remembered (see `remembered`); past this many, the writer starts afresh.
    remember_at_most = 50_000

    def __init__(self):
        super().__init__()
        quote = connection.ops.quote_name
        agent = quote(Agent._meta.db_table)
        # A lookup of the agent-id key per name: as `agent_id = ANY(...)`, the generic plan made
        # on a new hub's nearly empty table scanned `agent_state_seen_idx` for every active agent
        # and filtered them by name (EXPLAIN of the prepared statement). A null id: not active.
        self.active_agents_any = (
            f"SELECT v.name, (SELECT a.id FROM {agent} AS a WHERE a.agent_id = v.name"
            f" AND a.state = '{Agent.State.ACTIVE}') FROM unnest(%b::text[]) AS v (name)"
        )
        # A lookup of the client-id key per (sender, client id): as `sender_id = %s AND
        # client_id = ANY(...)`, the generic plan read every message of the sender and filtered
        # them by client id, 0.4 ms of the database's time per batch once a sender had sent
        # 1,600 messages (EXPLAIN ANALYZE of the prepared statement). A null: not stored.
        self.stored_client_ids_any = (
            f"SELECT v.sender_id, (SELECT m.client_id FROM {self.message} AS m"
            " WHERE m.sender_id = v.sender_id AND m.client_id = v.client_id"
            " AND m.client_id IS NOT NULL)"
            " FROM unnest(%b::bigint[], %b::text[]) AS v (sender_id, client_id)"
        )
        # The batch's call, prepared once per connection under a name of ours (`cursor`) and
        # run straight through libpq (`call`).
        numbers = ", ".join(f"${n}" for n in range(1, len(_WRITE_ARGUMENTS) + 1))
        self.prepare_write = (
            f"PREPARE {_WRITE} ({', '.join(_WRITE_ARGUMENTS)})"
            f" AS SELECT tag, key, number, channel FROM hub_write_batch({numbers})"
        )
        # Agent id: primary key of the agents found active, used by the writer thread only.
        self._known: dict[str, int] = {}

    def cursor(self, raw):
        """A cursor that binds on the server, so that statements can be prepared.

        The first time on a connection, its prepared statements (and the function's) are told to
        keep one generic plan: PostgreSQL planned the acks, the delivered marks and the
        client-id lookup afresh on every execution (a custom plan each, pg_prepared_statements),
        whose generic plans are the same index scans."""
        if raw.prepare_threshold is None:
            raw.execute("SET plan_cache_mode = force_generic_plan")
            raw.execute(self.prepare_write)
            pg_arrays.register(raw)
            raw.prepare_threshold = self.prepare_threshold
        return _BatchCursor(raw)

    def call(self, cursor, arguments: list[bytes | None]) -> list[tuple]:
        """Run the batch's call, its arguments already in PostgreSQL's binary formats; return
        its rows.

        Through psycopg's cursor, the call cost more of the writer's time than everything else
        in a small batch: for one send and one ack, its parameters' conversion (a dumper looked
        up and called for each of 32) and the prepared-statement and result bookkeeping around
        it. Here it is libpq's send of a statement prepared under a name of ours, and psycopg's
        own wait for the results; errors are psycopg's, as from a cursor. In a transaction of
        the caller's that nothing has begun yet (Django's atomic begins it with the first
        statement), psycopg's own step begins it first, as before any statement of a cursor's."""
        connection = cursor.connection
        pgconn = connection.pgconn
        with connection.lock:
            connection.wait(connection._start_query())
            pgconn.send_query_prepared(_WRITE_NAME, arguments, param_formats=_BINARY)
            results = connection.wait(generators.execute(pgconn))
        rows = []
        for result in results:
            if result.status != pq.ExecStatus.TUPLES_OK:
                raise psycopg.errors.error_from_result(result, encoding=connection.info.encoding)
            for row in range(result.ntuples):
                tag, key, number, channel = (result.get_value(row, column) for column in range(4))
                rows.append(
                    (
                        tag.decode(),
                        int(key),
                        None if number is None else int(number),
                        None if channel is None else channel.decode(),
                    )
                )
        return rows

    def query(self, cursor, statement: str, params):
        own = psycopg.Cursor(cursor.connection)
        own.execute(statement, params, prepare=True)
        return [own]

    def pipeline(self, cursor):
        """psycopg's pipeline mode: the lookups cost one round trip, not one each."""
        return cursor.connection.pipeline()

    def stored_client_ids(self, cursor, pairs: list[tuple[int, str]]):
        found = self.query(cursor, self.stored_client_ids_any, _columns(pairs, Bigints, Texts))
        return lambda: [row for row in _rows(found) if row[1] is not None]

    def active(self, cursor, names: list[str]):
        found = self.query(cursor, self.active_agents_any, (Texts(names),))

        def active():
            agents = {name: pk for name, pk in _rows(found) if pk is not None}
            if len(self._known) + len(agents) > self.remember_at_most:
                self._known.clear()
            self._known.update(agents)
            return agents

        return active

    def remembered(self, names: list[str]) -> dict[str, int]:
        """The recipients' lookup is a round trip of its own, before the transaction: for two
        or three sends a batch, a fifth of the writer's time (`write_batch` alone, 1,500
        batches). A recipient found active in an earlier batch is checked in the transaction
        instead, by primary key, and the batch has one round trip."""
        known = self._known
        return {name: known[name] for name in names if name in known}

    def require_active(self, cursor, agents: dict[str, int]) -> None:
        cursor.writes.checks.update(agents)

    def forget(self) -> None:
        self._known.clear()

    def transaction(self, cursor):
        """A batch's writes are one statement, its own transaction."""
        return self.gathering(cursor)

    @contextmanager
    def gathering(self, cursor):
        cursor.writes = writes = _Writes()
        yield
        cursor.writes = None
        if writes.any():
            writes.rows = _commit(
                cursor, self.call, writes.arguments(self.keyed_acks, self.keyed_rows)
            )

    def insert_messages(self, cursor, rows, created_at) -> None:
        cursor.writes.messages, cursor.writes.created = rows, created_at

    def store(self, cursor, counts: dict[int, int], deliveries: list[tuple]):
        writes = cursor.writes
        writes.counts, writes.deliveries = counts, deliveries
        return writes.last_seqs, writes.sockets

    def settle_up_to(self, cursor, now, recipient_id: int, after_seq: int, up_to_seq: int) -> list:
        writes = cursor.writes
        writes.moment, index = now, writes.settled()
        writes.acks.append((index, recipient_id, after_seq, up_to_seq))
        return [_Settled(writes, index)]

    def settle_ids(self, cursor, now, recipient_id: int, ids: list) -> list:
        writes = cursor.writes
        writes.moment, index = now, writes.settled()
        writes.id_acks += [(index, recipient_id, message_id) for message_id in ids]
        return [_Settled(writes, index)]

    def ack_silently(self, cursor, now, rows) -> None:
        cursor.writes.moment = now
        cursor.writes.silent_acks += rows

    def mark(self, cursor, now, rows) -> None:
        cursor.writes.moment = now
        cursor.writes.marks += rows

    def touch(self, cursor, now, connection_ids: list[int], agent_ids: list[int]) -> None:
        cursor.writes.moment = now
        cursor.writes.touched = (connection_ids, agent_ids)


# The name the batch's call is prepared under, and its arguments (hub_write_batch, messaging
# migration 0004): the time of the acks, marks and touches, the messages' creation time, then
# arrays; all in PostgreSQL's binary formats.
_WRITE = "hub_write_batch_call"
_WRITE_NAME = _WRITE.encode()
_WRITE_ARGUMENTS = (
    "timestamptz", "timestamptz",
    # remembered recipients to check: names, keys
    "text[]", "bigint[]",
    # messages: id, sender, kind, topic, payload, client id, recipients, expiry
    "uuid[]", "bigint[]", "text[]", "text[]", "text[]", "text[]", "integer[]", "timestamptz[]",
    # mailboxes: recipient, count
    "bigint[]", "bigint[]",
    # deliveries: message, recipient, seq counted back from the new last seq, expiry
    "uuid[]", "bigint[]", "bigint[]", "timestamptz[]",
    # acks up to a seq, keyed: count index (-1: no count wanted), recipient, seq settled before,
    # seq
    "integer[]", "bigint[]", "bigint[]", "bigint[]",
    # acks up to a seq, joined: recipient, seq settled before, seq
    "bigint[]", "bigint[]", "bigint[]",
    # acks by message id: count index, recipient, message
    "integer[]", "bigint[]", "uuid[]",
    # delivered marks, keyed and joined: recipient, seq
    "bigint[]", "bigint[]", "bigint[]", "bigint[]",
    # touched connections, agents
    "bigint[]", "bigint[]",
)  # fmt: skip
_BINARY = [pq.Format.BINARY] * len(_WRITE_ARGUMENTS)


class _BatchCursor(psycopg.Cursor):
    # The writes of the batch being gathered (`_PostgresStatements.gathering`).
    writes = None


class _Writes:
    """A batch's writes on PostgreSQL, gathered for one call of hub_write_batch."""

    def __init__(self):
        self.moment = self.created = None
        self.checks: dict[str, int] = {}
        self.messages: list[tuple] = []
        self.counts: dict[int, int] = {}
        self.deliveries: list[tuple] = []
        self.acks: list[tuple] = []  # (answer index, recipient, after seq, up to seq)
        self.silent_acks: list[tuple] = []  # (recipient, after seq, up to seq)
        self.id_acks: list[tuple] = []  # (answer index, recipient, message id)
        self.answers = 0
        self.marks: list[tuple] = []
        self.touched: tuple[list, list] = ([], [])
        self.rows: list[tuple] = []
        self._settled: dict[int, int] | None = None

    def any(self) -> bool:
        return bool(
            self.messages or self.acks or self.silent_acks or self.id_acks or self.marks
            or self.touched[0]
        )  # fmt: skip

    def settled(self) -> int:
        """The index of a new ack whose count is wanted."""
        self.answers += 1
        return self.answers - 1

    def arguments(self, keyed_ack_rows: int, keyed_rows: int) -> list[bytes | None]:
        """hub_write_batch's arguments in PostgreSQL's binary formats. An empty array goes as
        NULL, which the function reads as empty: nothing to write or for the server to read
        (most of a small batch's 31 arguments)."""
        boxes = sorted(self.counts)
        # The acks nobody waits to hear about (count index -1) keyed unless many; the marks
        # keyed where few.
        keyed_acks, joined_acks = self.acks, self.silent_acks
        if len(self.silent_acks) <= keyed_ack_rows:
            keyed_acks, joined_acks = keyed_acks + [(-1, *row) for row in joined_acks], []
        keyed_marks, joined_marks = (
            (self.marks, []) if len(self.marks) <= keyed_rows else ([], self.marks)
        )
        return [
            pg_arrays.timestamp(self.moment),
            pg_arrays.timestamp(self.created),
            *_binary_columns(list(self.checks.items()), Texts, Bigints),
            *_binary_columns(
                self.messages, Uuids, Bigints, Texts, Texts, Texts, Texts, Integers, Timestamps
            ),
            *_binary_columns([(box, self.counts[box]) for box in boxes], Bigints, Bigints),
            *_binary_columns(self.deliveries, Uuids, Bigints, Bigints, Timestamps),
            *_binary_columns(keyed_acks, Integers, Bigints, Bigints, Bigints),
            *_binary_columns(joined_acks, Bigints, Bigints, Bigints),
            *_binary_columns(self.id_acks, Integers, Bigints, Uuids),
            *_binary_columns(keyed_marks, Bigints, Bigints),
            *_binary_columns(joined_marks, Bigints, Bigints),
            *(_binary(Bigints, ids) for ids in self.touched),
        ]

    def last_seqs(self) -> dict[int, int]:
        return {key: number for tag, key, number, _ in self.rows if tag == "s"}

    def sockets(self) -> list[tuple[int, str]]:
        return [(key, channel) for tag, key, _, channel in self.rows if tag == "c"]

    def settled_counts(self) -> dict[int, int]:
        """Deliveries settled per ack whose count is wanted, by its index (read once)."""
        if self._settled is None:
            self._settled = {}
            for tag, key, number, _ in self.rows:
                if tag == "a":  # an ack by message ids has a row per id
                    self._settled[key] = self._settled.get(key, 0) + number
        return self._settled


@dataclass
class _Settled:
    """How many deliveries an ack of a gathered batch settled, once it is written."""

    writes: _Writes
    index: int

    @property
    def rowcount(self) -> int:
        return self.writes.settled_counts().get(self.index, 0)

    def close(self) -> None:
        pass


def _binary_columns(rows, *types) -> list[bytes | None]:
    """Rows as columns of these array types, each in PostgreSQL's binary format (None where
    there are no rows)."""
    if not rows:
        return [None] * len(types)
    return [
        _binary(array_type, column)
        for array_type, column in zip(types, zip(*rows, strict=True), strict=True)
    ]


def _binary(array_type: type[pg_arrays.Array], values) -> bytes | None:
    """`values` as an array in PostgreSQL's binary format; None (NULL) for no values."""
    return array_type.binary(values) if values else None


def _columns(rows, *types) -> list[pg_arrays.Array]:
    """Rows as columns of these array types: the parameters of a statement over `unnest`."""
    columns = list(zip(*rows, strict=True)) or [()] * len(types)
    return [array_type(list(column)) for array_type, column in zip(types, columns, strict=True)]


def _json_columns(count: int) -> str:
    """The first `count` elements of each row `json_each` reads, as columns."""
    return ", ".join(f"json_extract(value, '$[{index}]')" for index in range(count))


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
    """One transaction on the driver's cursor (`_Statements.transaction`).

    Django's atomic() cost about 50 µs of CPU a batch here (its bookkeeping, and a Django cursor
    built for each BEGIN): a batch of one send, one ack and one mark on SQLite took 187 µs with
    it and 128-140 µs without. Inside a caller's atomic block (tests) this is a savepoint of
    Django's instead."""
    if db.in_atomic_block:
        with transaction.atomic(using=db.alias), sql.gathering(cursor):
            yield
        return
    with sql.transaction(cursor):
        yield


def _commit(cursor, call=None, arguments=None) -> list[tuple]:
    """Commit a batch: COMMIT, or on PostgreSQL the call of its gathered writes (`call`), a
    transaction of its own (or part of a caller's), whose rows it returns."""
    if call is None:
        cursor.execute("COMMIT")
        return []
    return call(cursor, arguments)


@contextmanager
def _driver_cursor(db, sql: _Statements):
    """The database driver's own cursor on Django's connection `db`, its errors Django's."""
    db.ensure_connection()
    with db.wrap_database_errors, closing(sql.cursor(db.connection)) as cursor:
        yield cursor


def _json(payload) -> str:
    try:
        return orjson.dumps(payload).decode()
    except TypeError:  # an integer beyond 64 bits, say
        return json.dumps(payload)


# --- Deciding what to store -----------------------------------------------------------------------


DIRECT_KINDS = (Message.Kind.DIRECT, Message.Kind.REQUEST)


def _look_up(cursor, sql: _Statements, sends: list[Outgoing], results: list):
    """Look up the named recipients of the direct sends and answer the sends whose client id an
    earlier, committed message already has. Returns {agent_id: pk} of the active recipients and
    those of them remembered from earlier batches, to be checked in the transaction."""
    names = sorted({send.to for send in sends if send.kind in DIRECT_KINDS})
    remembered = sql.remembered(names)
    unknown = [name for name in names if name not in remembered]
    wanted = sorted(
        {(send.sender.pk, send.client_id) for send in sends if send.client_id is not None}
    )
    if not (unknown or wanted):
        return remembered, remembered
    with sql.pipeline(cursor):  # both lookups in one round trip on PostgreSQL
        found = sql.active(cursor, unknown) if unknown else dict
        stored = sql.stored_client_ids(cursor, wanted) if wanted else list
    existing = set(stored())
    for index, send in enumerate(sends):
        if existing and (send.sender.pk, send.client_id) in existing:
            results[index] = services.duplicate_of(send.sender, send.client_id)
    return {**remembered, **found()}, remembered


def _resolve(sends: list[Outgoing], results: list, direct: dict[str, int]) -> dict[int, list[int]]:
    """Check each send not answered yet; return the recipients of each one to store.

    Refusals (policy, unknown recipient) are answered in `results`; a repeat of a client id
    within the batch gets the index of its first send, settled after the commit.
    """
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
            if send.kind in DIRECT_KINDS:
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


@dataclass
class _Stored:
    """What a batch stored of its sends, to be answered once it is committed."""

    recipients: dict[int, list[int]]
    counts: dict[int, int]  # deliveries per recipient
    message_ids: dict[int, uuid.UUID]
    sent_at: object
    last_seqs: object  # () -> {recipient: new last seq}
    sockets: object  # () -> [(recipient, channel name)]


def _store(db, cursor, sql: _Statements, sends, recipients) -> _Stored:
    """Insert the messages and deliveries of `recipients`, each recipient's numbered in batch
    order."""
    now = timezone.now()
    adapt = db.ops.adapt_datetimefield_value
    message_rows, deliveries, counts, ids = [], [], {}, {}
    for (index, recipient_ids), message_id in zip(
        recipients.items(), new_ids(len(recipients)), strict=True
    ):
        send = sends[index]
        ids[index] = message_id
        stored_id = sql.uuid(message_id)
        expires_at = adapt(now + timedelta(seconds=send.ttl) if send.ttl else None)
        message_rows.append(
            (
                stored_id,
                send.sender.pk,
                send.kind,
                send.topic or "",
                _json(send.payload),
                send.client_id,
                len(recipient_ids),
                expires_at,
            )
        )
        for recipient_id in recipient_ids:
            counts[recipient_id] = counts.get(recipient_id, 0) + 1
            # For now the count of this recipient's deliveries so far; `back` once all are in.
            deliveries.append([stored_id, recipient_id, counts[recipient_id], expires_at])
    for row in deliveries:
        row[2] = counts[row[1]] - row[2]
    sql.insert_messages(cursor, message_rows, adapt(now))
    # A topic nobody subscribes to: a message with no recipient.
    last_seqs, sockets = sql.store(cursor, counts, deliveries) if counts else (dict, list)
    return _Stored(recipients, counts, ids, now, last_seqs, sockets)


def _answer_stored(stored: _Stored, sends, results, frames) -> dict[int, list[str]]:
    """Fill `results` and `frames` for what was committed; return the recipients' open sockets'
    channel names."""
    channels: dict[int, list[str]] = {}
    for agent_id, channel_name in stored.sockets():
        channels.setdefault(agent_id, []).append(channel_name)
    last = stored.last_seqs()
    # Each recipient's numbers were reserved in batch order, ending at its new last seq.
    next_seq = {recipient_id: last[recipient_id] - n for recipient_id, n in stored.counts.items()}
    sent_at = protocol.isoformat(stored.sent_at)  # the frames' texts, made once each
    for index, recipient_ids in stored.recipients.items():
        send, message_id = sends[index], stored.message_ids[index]
        message_id_text = None
        connected = 0
        for recipient_id in recipient_ids:
            seq = next_seq[recipient_id] = next_seq[recipient_id] + 1
            if recipient_id in channels:
                connected += 1
                if message_id_text is None:
                    message_id_text = str(message_id)
                frames.setdefault(recipient_id, []).append(
                    protocol.message_frame(
                        message_id=message_id_text,
                        seq=seq,
                        kind=send.kind,
                        sender=send.sender.agent_id,
                        payload=send.payload,
                        sent_at=sent_at,
                        topic=send.topic or "",
                    )
                )
        status = "delivered" if connected == len(recipient_ids) else "queued"
        results[index] = services.Accepted(
            message_id, status, len(recipient_ids), False, tuple(recipient_ids)
        )
    return channels


def _settle_acks(cursor, sql: _Statements, acks: list[Ack], now) -> list[list | None]:
    """Apply the acks. Where the client asked what an ack settled, its statements' cursors,
    whose row counts say it once the transaction is done (`_counts`); None for the others."""
    settling: list[list | None] = []
    silent = []
    for ack in acks:
        if ack.up_to_seq is not None and not ack.answer:
            silent.append((ack.recipient_id, ack.after_seq, ack.up_to_seq))
            settling.append(None)
        elif ack.up_to_seq is not None:
            settling.append(
                sql.settle_up_to(cursor, now, ack.recipient_id, ack.after_seq, ack.up_to_seq)
            )
        else:
            ids = [sql.uuid(value) for value in ack.message_ids]
            settling.append(sql.settle_ids(cursor, now, ack.recipient_id, ids))
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
    sql.touch(cursor, now, sorted(touches), sorted(set(touches.values())))


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
    with _driver_cursor(db, sql) as cursor:
        direct, remembered = _look_up(cursor, sql, sends, results)
        # Refusals are audited outside the batch's transaction, which they must not abort.
        recipients = _resolve(sends, results, direct)
        try:
            with db.wrap_database_errors, _transaction(db, cursor, sql):
                if remembered:
                    sql.require_active(cursor, remembered)
                stored = _store(db, cursor, sql, sends, recipients) if recipients else None
                now = db.ops.adapt_datetimefield_value(timezone.now())
                settling = _settle_acks(cursor, sql, acks, now)
                if marks:
                    _mark_delivered(cursor, sql, marks, now)
                if touches:
                    _touch(cursor, sql, touches, now)
        except IntegrityError:
            # A remembered recipient no longer active, or a client id another server stored
            # meanwhile: each send on its own, its recipient looked up afresh.
            sql.forget()
            return _write_one_by_one(sends, acks, marks, touches)
        acked = _counts(settling)
        channels = _answer_stored(stored, sends, results, frames) if stored else {}
    for index, result in enumerate(results):
        if isinstance(result, int):  # a repeat, within this batch, of an earlier send's id
            first = results[result]
            results[index] = (
                replace(first, duplicate=True, recipient_ids=())
                if isinstance(first, services.Accepted)
                else first
            )
    if not telemetry.accepted_messages_logged():
        # Counted by kind, a batch at a time: the log line, and the socket's context that gives
        # it its fields, were a few microseconds of the writer's per message.
        counts: dict[str, list[int]] = {}
        for index in recipients:
            each = counts.setdefault(sends[index].kind, [0, 0])
            each[0] += 1
            each[1] += results[index].recipients
        for kind, (count, recipient_count) in counts.items():
            telemetry.messages_accepted(kind, count, recipient_count)
        return BatchResult(results, acked, frames, channels)
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
    with transaction.atomic(), _driver_cursor(connections[DEFAULT_DB_ALIAS], sql) as cursor:
        now = connection.ops.adapt_datetimefield_value(timezone.now())
        with sql.gathering(cursor):
            settling = _settle_acks(cursor, sql, acks, now)
            _mark_delivered(cursor, sql, marks, now)
            if touches:
                _touch(cursor, sql, touches, now)
        acked = _counts(settling)
    # message_send nudged its recipients through the channel layer already.
    return BatchResult(results, acked, {}, {})
