"""Group commit: the sends, acks and delivered marks of many sockets stored in one transaction."""

import asyncio
import re
import threading
import time
from datetime import timedelta

import psycopg
import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import OperationalError, close_old_connections, connection, transaction
from django.utils import timezone

from agents import services as agent_services
from agents.models import Agent, Connection
from messaging import batch
from messaging import engine as engine_module
from messaging.engine import engine
from messaging.models import Delivery, Message
from messaging.services import Accepted, UnknownRecipient

from .conftest import connect, receive, receive_messages, request

pytestmark = pytest.mark.django_db(transaction=True)


def outgoing(sender, to, payload, **fields) -> batch.Outgoing:
    return batch.Outgoing(
        sender=sender.agent, kind=Message.Kind.DIRECT, payload=payload, to=to, **fields
    )


def inbox(credentials) -> list[tuple]:
    rows = Delivery.objects.filter(recipient=credentials.agent).order_by("seq")
    return list(rows.values_list("seq", "message__payload", "status"))


def test_a_batch_numbers_each_recipients_messages_in_batch_order(alice, bob, carol):
    sends = [
        outgoing(alice, "bob", "a1"),
        outgoing(carol, "bob", "c1"),
        outgoing(alice, "carol", "a2"),
        outgoing(bob, "bob", "b1"),
    ]
    result = batch.write_batch(sends, [], {})
    assert all(isinstance(accepted, Accepted) for accepted in result.sends)
    assert [accepted.status for accepted in result.sends] == ["queued"] * 4  # nobody connected
    assert inbox(bob) == [(1, "a1", "queued"), (2, "c1", "queued"), (3, "b1", "queued")]
    assert inbox(carol) == [(1, "a2", "queued")]
    batch.write_batch([outgoing(carol, "bob", "c2")], [], {})
    assert inbox(bob)[-1] == (4, "c2", "queued")


def test_a_refusal_stays_with_its_send_and_the_rest_are_stored(alice, bob):
    sends = [outgoing(alice, "bob", 1), outgoing(alice, "nobody", 2), outgoing(alice, "bob", 3)]
    result = batch.write_batch(sends, [], {})
    assert isinstance(result.sends[0], Accepted) and isinstance(result.sends[2], Accepted)
    assert isinstance(result.sends[1], UnknownRecipient)
    assert [payload for _, payload, _ in inbox(bob)] == [1, 3]
    assert Message.objects.count() == 2


def test_a_recipient_disabled_or_replaced_since_an_earlier_batch_is_looked_up_afresh(
    alice, bob, carol
):
    batch.write_batch([outgoing(alice, "bob", 1), outgoing(alice, "carol", 1)], [], {})
    # Another server (or an operator) disables bob.
    Agent.objects.filter(pk=bob.agent.pk).update(state=Agent.State.DISABLED)
    refused, accepted = batch.write_batch(
        [outgoing(alice, "bob", 2), outgoing(bob, "alice", 2)], [], {}
    ).sends
    assert isinstance(refused, UnknownRecipient) and isinstance(accepted, Accepted)
    assert [payload for _, payload, _ in inbox(bob)] == [1]
    [again] = batch.write_batch([outgoing(alice, "bob", 3)], [], {}).sends
    assert isinstance(again, UnknownRecipient)
    # carol is deregistered and registered anew: a new agent under the same name.
    Agent.objects.filter(pk=carol.agent.pk).delete()
    new_carol, _ = agent_services.agent_register(agent_id="carol")
    [accepted] = batch.write_batch([outgoing(alice, "carol", 2)], [], {}).sends
    assert accepted.recipient_ids == (new_carol.pk,)
    assert Delivery.objects.get(recipient=new_carol).message.payload == 2


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="SQLite's statements cost no round trip"
)
def test_a_batch_to_recipients_found_before_is_one_statement(alice, bob, monkeypatch):
    statements = []
    execute = psycopg.Cursor.execute
    sql = batch._statements("postgresql")
    call = sql.call

    def executed(cursor, query, *args, **kwargs):
        if query in (sql.active_agents_any, sql.stored_client_ids_any):  # not the ORM's
            statements.append(query)
        return execute(cursor, query, *args, **kwargs)

    def called(cursor, arguments):
        statements.append("hub_write_batch")
        return call(cursor, arguments)

    batch.write_batch([], [], {})  # the connection's set-up
    monkeypatch.setattr(psycopg.Cursor, "execute", executed)
    monkeypatch.setattr(sql, "call", called)
    batch.write_batch([outgoing(alice, "bob", 1)], [], {})
    assert len(statements) == 2  # the lookup, then the writes
    statements.clear()
    batch.write_batch([outgoing(alice, "bob", 2), outgoing(bob, "alice", 2)], [], {})
    assert len(statements) == 2  # alice is new to the writer
    statements.clear()
    result = batch.write_batch(
        [outgoing(alice, "bob", 3), outgoing(bob, "alice", 3)],
        [batch.Ack(bob.agent.pk, up_to_seq=1)],
        {bob.agent.pk: [2]},
        {},
    )
    assert statements == ["hub_write_batch"]
    assert result.acks == [1]
    assert inbox(bob) == [(1, 1, "acked"), (2, 2, "delivered"), (3, 3, "queued")]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the call of PostgreSQL's batch")
def test_a_batch_call_that_begins_a_callers_transaction_is_rolled_back_with_it(alice, bob):
    batch.write_batch([outgoing(alice, "bob", 1)], [], {})
    sql = batch._statements("postgresql")
    with transaction.atomic():
        # The call is the transaction's first statement.
        with batch._driver_cursor(connection, sql) as cursor, sql.gathering(cursor):
            sql.ack_silently(cursor, timezone.now(), [(bob.agent.pk, 0, 1)])
        assert inbox(bob) == [(1, 1, "acked")]
        transaction.set_rollback(True)
    assert inbox(bob) == [(1, 1, "queued")]


def test_a_client_id_repeated_in_a_batch_or_after_it_is_stored_once(alice, bob):
    first, again = batch.write_batch(
        [outgoing(alice, "bob", "a", client_id="x"), outgoing(alice, "bob", "b", client_id="x")],
        [],
        {},
    ).sends
    assert not first.duplicate and again.duplicate
    assert again.message_id == first.message_id
    [later] = batch.write_batch([outgoing(alice, "bob", "c", client_id="x")], [], {}).sends
    assert later.duplicate and later.message_id == first.message_id
    assert [payload for _, payload, _ in inbox(bob)] == ["a"]


def test_a_client_id_committed_by_another_writer_meanwhile_answers_a_duplicate(
    alice, bob, monkeypatch
):
    [first] = batch.write_batch([outgoing(alice, "bob", "a", client_id="x")], [], {}).sends
    # Another server commits the same client id between this writer's check and its insert.
    sql = batch._statements(connection.vendor)
    monkeypatch.setattr(sql, "stored_client_ids", lambda cursor, pairs: list)
    repeat, other = batch.write_batch(
        [outgoing(alice, "bob", "b", client_id="x"), outgoing(alice, "bob", "c")], [], {}
    ).sends
    assert repeat.duplicate and repeat.message_id == first.message_id
    assert not other.duplicate
    assert [payload for _, payload, _ in inbox(bob)] == ["a", "c"]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="a server that drops the session")
def test_a_batch_on_a_dropped_connection_fails_alone_and_the_next_one_reconnects(alice, bob):
    batch.write_batch([outgoing(alice, "bob", "a")], [], {})
    backend = connection.connection.info.backend_pid
    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [backend])
    with pytest.raises(OperationalError):
        batch.write_batch([outgoing(alice, "bob", "lost")], [], {})
    # What database_sync_to_async does before the writer's next batch.
    close_old_connections()
    [accepted] = batch.write_batch([outgoing(alice, "bob", "b")], [], {}).sends
    assert isinstance(accepted, Accepted)
    assert [payload for _, payload, _ in inbox(bob)] == ["a", "b"]


# On PostgreSQL, a statement per row or one over arrays for them all (batch._PostgresStatements).
@pytest.mark.parametrize("keyed_rows", [0, 1000])
def test_acks_and_delivered_marks_are_written_with_the_batch(alice, bob, keyed_rows, monkeypatch):
    monkeypatch.setattr(batch._PostgresStatements, "keyed_rows", keyed_rows)
    sent = batch.write_batch([outgoing(alice, "bob", n) for n in range(5)], [], {}).sends
    acks = [
        batch.Ack(bob.agent.pk, up_to_seq=2),
        batch.Ack(bob.agent.pk, message_ids=[sent[3].message_id, sent[4].message_id]),
        batch.Ack(bob.agent.pk, up_to_seq=4, answer=False),
    ]
    result = batch.write_batch([], acks[:2], {bob.agent.pk: [3]})
    assert result.acks == [2, 2]
    statuses = ["acked", "acked", "delivered", "acked", "acked"]
    assert [status for _, _, status in inbox(bob)] == statuses
    assert Delivery.objects.get(recipient=bob.agent, seq=3).attempts == 1
    # An ack records the delivery its client saw where no mark did, by seq or by message id.
    for acked in Delivery.objects.filter(recipient=bob.agent, seq__in=[1, 2, 4, 5]):
        assert acked.attempts == 1 and acked.delivered_at == acked.acked_at
    assert batch.write_batch([], acks[2:], {}).acks == [None]
    assert [status for _, _, status in inbox(bob)] == ["acked"] * 5


def test_what_a_batch_stores_reads_back_as_it_was_sent(alice, bob, carol):
    payloads = [
        {"text": 'quotes " and \\ backslashes', "unicode": "naïve 日本 😀", "nested": [1, [2.5]]},
        "a string",
        -(2**63),
        None,
        [True, False, {}],
    ]
    client_ids = ['id "1" \\ ä', "😀", None, "x" * 128, "plain"]
    sends = [
        outgoing(alice, "bob", payload, client_id=client_id, ttl=60 if n % 2 else None)
        for n, (payload, client_id) in enumerate(zip(payloads, client_ids, strict=True))
    ]
    sends.append(outgoing(carol, "bob", "last", ttl=5))
    before = timezone.now()
    accepted = batch.write_batch(sends, [], {}).sends
    for send, answer in zip(sends, accepted, strict=True):
        message = Message.objects.get(pk=answer.message_id)
        delivery = Delivery.objects.get(message=message)
        assert message.payload == send.payload
        assert (message.sender_id, message.client_id) == (send.sender.pk, send.client_id)
        assert (message.kind, message.topic, message.recipient_count) == ("direct", "", 1)
        assert before <= message.created_at <= timezone.now()
        if send.ttl:
            assert message.expires_at == message.created_at + timedelta(seconds=send.ttl)
        else:
            assert message.expires_at is None
        assert delivery.expires_at == message.expires_at
        assert (delivery.recipient_id, delivery.status, delivery.attempts) == (
            bob.agent.pk,
            "queued",
            0,
        )
    assert [seq for seq, _, _ in inbox(bob)] == list(range(1, len(sends) + 1))


def test_quiet_acks_of_one_recipient_in_one_batch_settle_each_delivery_once(alice, bob):
    batch.write_batch([outgoing(alice, "bob", n) for n in range(5)], [], {})
    quiet = [batch.Ack(bob.agent.pk, up_to_seq=seq, answer=False) for seq in (2, 4, 3)]
    batch.write_batch([], quiet, {})
    assert [status for _, _, status in inbox(bob)] == ["acked"] * 4 + ["queued"]
    for acked in Delivery.objects.filter(recipient=bob.agent, status="acked"):
        assert acked.attempts == 1 and acked.delivered_at == acked.acked_at


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's statements")
def test_a_batch_on_sqlite_runs_as_many_statements_whatever_its_size(alice, bob, carol):
    def statements(sends: int) -> int:
        batch.write_batch([outgoing(alice, "bob", 0), outgoing(alice, "carol", 0)], [], {})
        # A batch of sends to both, quiet acks of both and delivered marks of both.
        sent = [outgoing(alice, ("bob", "carol")[n % 2], n) for n in range(sends)]
        acks = [batch.Ack(who.agent.pk, up_to_seq=1, answer=False) for who in (bob, carol)] * sends
        marks = {bob.agent.pk: [2], carol.agent.pk: [2]}
        traced = []
        connection.ensure_connection()
        connection.connection.set_trace_callback(traced.append)
        try:
            batch.write_batch(sent, acks, marks)
        finally:
            connection.connection.set_trace_callback(None)
        return len(traced)

    # With a statement per row (executemany) these were 17 and 809.
    assert statements(2) == statements(200)


def test_an_ack_up_to_a_seq_reads_only_the_deliveries_after_its_settled_seq(alice, bob):
    batch.write_batch([outgoing(alice, "bob", n) for n in range(5)], [], {})
    result = batch.write_batch([], [batch.Ack(bob.agent.pk, up_to_seq=5, after_seq=2)], {})
    assert result.acks == [3]
    quiet = batch.Ack(bob.agent.pk, up_to_seq=5, after_seq=1, answer=False)
    batch.write_batch([], [quiet], {})
    assert [status for _, _, status in inbox(bob)] == ["queued"] + ["acked"] * 4


def test_many_quiet_acks_in_a_batch_read_only_after_their_settled_seq(alice, bob, monkeypatch):
    monkeypatch.setattr(batch._PostgresStatements, "keyed_acks", 1)  # joined from two on
    batch.write_batch([outgoing(alice, "bob", n) for n in range(6)], [], {})
    quiet = [batch.Ack(bob.agent.pk, up_to_seq=seq, after_seq=3, answer=False) for seq in (5, 6)]
    batch.write_batch([], quiet, {})
    assert [status for _, _, status in inbox(bob)] == ["queued"] * 3 + ["acked"] * 3


def _deliveries_statistic(figure: str) -> int:
    """A sum over PostgreSQL's statistics views (`figure`, with its FROM and a relname = %s)
    for the deliveries' table, as far as this session has read it."""
    with connection.cursor() as cursor:
        # What this session read is counted once it goes idle; forced, that is now.
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute(f"SELECT pg_stat_clear_snapshot(), {figure}", [Delivery._meta.db_table])
        return cursor.fetchone()[1]


def _entries_read() -> int:
    """Entries of the deliveries' indexes this session's scans have read so far."""
    return _deliveries_statistic("sum(idx_tup_read) FROM pg_stat_user_indexes WHERE relname = %s")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's statistics")
@pytest.mark.parametrize("answer", [True, False])
def test_an_ack_reads_its_window_not_the_recipients_history(alice, bob, answer):
    batch.write_batch([outgoing(alice, "bob", n) for n in range(300)], [], {})
    for up_to in range(10, 300, 10):
        ack = batch.Ack(bob.agent.pk, up_to_seq=up_to, after_seq=up_to - 10, answer=answer)
        batch.write_batch([], [ack], {})
    before = _entries_read()
    ack = batch.Ack(bob.agent.pk, up_to_seq=300, after_seq=290, answer=answer)
    batch.write_batch([], [ack], {})
    # Bounded below it reads its ten deliveries, however the writer planned it; from the
    # first seq it read 300, through either index of the recipient's deliveries.
    assert _entries_read() - before <= 20
    assert [status for _, _, status in inbox(bob)] == ["acked"] * 300


async def test_an_ack_reads_after_the_seq_its_recipients_committed_acks_settled(alice, bob):
    writer = engine()
    await asyncio.gather(*[writer.send(outgoing(alice, "bob", n)) for n in range(8)])

    async def ack(up_to_seq: int, seen_seq: int) -> tuple[int, int]:
        """How many deliveries an ack of bob's settled, and the seq it read after."""
        each = batch.Ack(bob.agent.pk, up_to_seq=up_to_seq, seen_seq=seen_seq)
        return await writer.ack(each), each.after_seq

    assert await ack(4, seen_seq=3) == (4, 0)
    # Settled up to the smaller of the seq acked and the seq its socket had seen.
    assert await ack(6, seen_seq=6) == (2, 3)
    # Forgotten (a replay), and an ack queued before that does not move it on.
    stale = writer.ack(batch.Ack(bob.agent.pk, up_to_seq=7, seen_seq=7))
    writer.forget_settled(bob.agent.pk)
    assert await stale == 1
    assert await ack(8, seen_seq=8) == (1, 0)
    assert await ack(8, seen_seq=8) == (0, 8)


async def test_sends_queued_together_are_stored_in_one_transaction(alice, bob):
    writer = engine()
    futures = [writer.send(outgoing(alice, "bob", n)) for n in range(20)]
    accepted = await asyncio.gather(*futures)
    assert writer.batches_written == 1
    assert len({a.message_id for a in accepted}) == 20
    rows = await database_sync_to_async(inbox)(bob)
    assert [(seq, payload) for seq, payload, _ in rows] == [(n + 1, n) for n in range(20)]


async def test_a_socket_reads_on_while_its_send_waits_for_the_database(alice, locked_database):
    a, _ = await connect(alice)
    await locked_database.hold()
    await a.send_json_to({"type": "send", "to": "alice", "payload": 1, "ref": "s1"})
    await a.send_json_to({"type": "heartbeat", "ref": "h1"})
    # The heartbeat is answered while the send still waits for the locked database.
    assert (await receive(a))["ref"] == "h1"
    answer = await receive(a)
    assert answer["ref"] == "s1" and answer["type"] == "error" and answer["code"] == "unavailable"
    locked_database.release()
    await a.disconnect()


async def test_a_recipient_on_this_process_gets_its_frames_without_the_channel_layer(
    alice, bob, monkeypatch
):
    a, _ = await connect(alice)
    b, _ = await connect(bob)

    async def unreachable(*args, **kwargs):
        raise ConnectionError("the channel layer is down")

    monkeypatch.setattr(get_channel_layer(), "group_send", unreachable)
    for n in range(3):
        await a.send_json_to({"type": "send", "to": "bob", "payload": n})
    frames = await receive_messages(b, 3, timeout=2)
    assert [frame["payload"] for frame in frames] == [0, 1, 2]
    await a.disconnect()
    await b.disconnect()


def test_liveness_touches_are_written_with_the_batch(alice, bob):
    long_ago = timezone.now() - timedelta(hours=1)
    connection = agent_services.connection_open(
        agent=alice.agent, channel_name="c.1", server="s", remote_addr="", user_agent=""
    )
    Connection.objects.update(last_seen_at=long_ago)
    Agent.objects.update(last_seen_at=long_ago)
    batch.write_batch([], [], {}, {connection.pk: alice.agent.pk})
    assert Connection.objects.get(pk=connection.pk).last_seen_at > long_ago
    assert Agent.objects.get(pk=alice.agent.pk).last_seen_at > long_ago
    assert Agent.objects.get(pk=bob.agent.pk).last_seen_at == long_ago


async def test_a_frame_on_a_socket_marks_its_connection_and_agent_alive(alice, hub_settings):
    hub_settings(HEARTBEAT_INTERVAL=0)  # every frame counts as a sign of life
    a, _ = await connect(alice)
    long_ago = timezone.now() - timedelta(hours=1)

    def last_seen():
        Connection.objects.update(last_seen_at=long_ago)
        Agent.objects.update(last_seen_at=long_ago)

    await database_sync_to_async(last_seen)()
    assert (await request(a, {"type": "heartbeat"}))["type"] == "heartbeat_ack"

    def seen_again() -> bool:
        connection = Connection.objects.get(agent=alice.agent)
        return connection.last_seen_at > long_ago and connection.agent.last_seen_at > long_ago

    for _ in range(100):
        if await database_sync_to_async(seen_again)():
            break
        await asyncio.sleep(0.02)
    assert await database_sync_to_async(seen_again)()
    await a.disconnect()


async def test_a_closed_writer_stores_what_was_queued_and_the_next_send_starts_another(alice, bob):
    writer = engine()
    queued = [writer.send(outgoing(alice, "bob", n)) for n in range(3)]
    await writer.close()
    assert all(future.done() for future in queued)
    assert not any(thread.name == "hub-writer" for thread in threading.enumerate())
    later = await writer.send(outgoing(alice, "bob", 3))
    assert isinstance(later, Accepted)
    rows = await database_sync_to_async(inbox)(bob)
    assert [payload for _, payload, _ in rows] == [0, 1, 2, 3]


def _status(credentials, seq) -> str:
    return Delivery.objects.get(recipient=credentials.agent, seq=seq).status


async def _until_status(credentials, seq, status: str, waited_for: str) -> None:
    deadline = time.monotonic() + 5
    while await database_sync_to_async(_status)(credentials, seq) != status:
        assert time.monotonic() < deadline, f"the {waited_for}"
        await asyncio.sleep(0.02)


async def _three_sent_to_bob(writer, alice) -> int:
    """Send three messages through `writer`; how many batches it had written then."""
    for n in range(3):
        await writer.send(outgoing(alice, "bob", n))
    return writer.batches_written


async def _statuses(credentials, seqs) -> list[str]:
    return [await database_sync_to_async(_status)(credentials, seq) for seq in seqs]


async def _until_a_batch_after(writer, written: int) -> None:
    deadline = time.monotonic() + 5
    while writer.batches_written == written and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def _a_message_from_alice_to_bob(alice, bob):
    """Alice's and Bob's sockets, and the message frame Bob got from Alice."""
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    await request(a, {"type": "send", "to": "bob", "payload": 1, "ref": "s"})
    [frame] = await receive_messages(b, 1)
    return a, b, frame


async def test_a_delivered_mark_alone_waits_for_the_record_delay(alice, bob, monkeypatch):
    monkeypatch.setattr(engine_module, "RECORD_DELAY", 0.5)
    writer = engine()
    await writer.send(outgoing(alice, "bob", 1))
    written = writer.batches_written
    writer.mark_delivered(bob.agent.pk, [1])
    await asyncio.sleep(0.1)
    assert writer.batches_written == written  # no batch for a mark alone yet
    assert await database_sync_to_async(_status)(bob, 1) == "queued"
    await _until_a_batch_after(writer, written)
    assert await database_sync_to_async(_status)(bob, 1) == "delivered"


async def test_delivered_marks_wait_for_their_delay_while_sends_are_written(
    alice, bob, monkeypatch
):
    monkeypatch.setattr(engine_module, "RECORD_DELAY", 0.3)
    writer = engine()
    written = await _three_sent_to_bob(writer, alice)
    writer.mark_delivered(bob.agent.pk, [1, 2])
    await writer.send(outgoing(alice, "bob", 3))
    assert writer.batches_written == written + 1
    statuses = await _statuses(bob, (1, 2, 3, 4))
    assert statuses == ["queued"] * 4
    # Due, they go with the next batch, or one of their own.
    await _until_status(bob, 2, "delivered", "marks never written")
    assert await _statuses(bob, (1, 2, 3, 4)) == ["delivered", "delivered", "queued", "queued"]


@pytest.mark.parametrize("answer", [True, False])
async def test_an_ack_drops_the_queued_marks_it_covers_and_records_the_delivery(
    alice, bob, monkeypatch, answer
):
    monkeypatch.setattr(engine_module, "RECORD_DELAY", 60)
    monkeypatch.setattr(engine_module, "ACK_DELAY", 0.05)
    writer = engine()
    await _three_sent_to_bob(writer, alice)
    writer.mark_delivered(bob.agent.pk, [1, 2, 3])
    ack = batch.Ack(bob.agent.pk, up_to_seq=2, answer=answer)
    future = writer.ack(ack) if answer else writer.ack_quietly(ack)
    assert writer._marks == {bob.agent.pk: [3]}  # no statement for the marks the ack covers
    if answer:
        assert await future == 2
    else:
        await _until_status(bob, 2, "acked", "quiet ack never written")
    await writer.write_records_now()

    def rows():
        deliveries = Delivery.objects.filter(recipient=bob.agent).order_by("seq")
        return [(row.status, row.attempts, row.delivered_at is not None) for row in deliveries]

    # Each delivery was written to the socket once: acked ones count it without their mark.
    assert await database_sync_to_async(rows)() == [
        ("acked", 1, True),
        ("acked", 1, True),
        ("delivered", 1, True),
    ]


async def test_acks_a_client_waits_to_hear_about_are_written_at_once(alice, bob, monkeypatch):
    monkeypatch.setattr(engine_module, "RECORD_DELAY", 60)
    monkeypatch.setattr(engine_module, "ACK_DELAY", 60)
    writer = engine()
    await writer.send(outgoing(alice, "bob", 0))
    writer.mark_delivered(bob.agent.pk, [1])
    acked = await asyncio.wait_for(writer.ack(batch.Ack(bob.agent.pk, up_to_seq=1)), 5)
    assert acked == 1


async def test_a_quiet_ack_alone_waits_for_the_ack_delay(alice, bob, monkeypatch):
    monkeypatch.setattr(engine_module, "RECORD_DELAY", 60)
    monkeypatch.setattr(engine_module, "ACK_DELAY", 0.5)
    writer = engine()
    await writer.send(outgoing(alice, "bob", 1))
    written = writer.batches_written
    writer.ack_quietly(batch.Ack(bob.agent.pk, up_to_seq=1, answer=False))
    await asyncio.sleep(0.1)
    assert writer.batches_written == written  # no batch for a quiet ack alone yet
    assert await database_sync_to_async(_status)(bob, 1) == "queued"
    await _until_a_batch_after(writer, written)
    assert await database_sync_to_async(_status)(bob, 1) == "acked"


async def test_a_quiet_ack_goes_with_the_next_send_and_the_marks_wait(alice, bob, monkeypatch):
    monkeypatch.setattr(engine_module, "RECORD_DELAY", 60)
    monkeypatch.setattr(engine_module, "ACK_DELAY", 60)
    writer = engine()
    written = await _three_sent_to_bob(writer, alice)
    writer.mark_delivered(bob.agent.pk, [2, 3])
    writer.ack_quietly(batch.Ack(bob.agent.pk, up_to_seq=1, answer=False))
    await writer.send(outgoing(alice, "bob", 3))
    assert writer.batches_written == written + 1
    statuses = await _statuses(bob, (1, 2, 3, 4))
    assert statuses == ["acked", "queued", "queued", "queued"]  # the marks wait for their delay
    # A closing socket has everything queued written at once.
    await writer.write_records_now()
    statuses = await _statuses(bob, (1, 2, 3, 4))
    assert statuses == ["acked", "delivered", "delivered", "queued"]


async def test_a_session_opening_here_reads_the_backlog_after_the_queued_acks(
    alice, bob, monkeypatch
):
    monkeypatch.setattr(engine_module, "RECORD_DELAY", 60)
    monkeypatch.setattr(engine_module, "ACK_DELAY", 60)
    a, first, frame = await _a_message_from_alice_to_bob(alice, bob)
    await first.send_json_to({"type": "ack", "up_to_seq": frame["seq"]})
    await asyncio.sleep(0.05)
    assert await database_sync_to_async(_status)(bob, 1) == "queued"  # mark and ack wait here
    second, welcome = await connect(bob)
    assert welcome["pending"] == 0
    assert await second.receive_nothing(0.2)
    assert await database_sync_to_async(_status)(bob, 1) == "acked"
    for socket in (a, first, second):
        await socket.disconnect()


async def test_a_closing_socket_has_its_quiet_acks_written_at_once(alice, bob, monkeypatch):
    monkeypatch.setattr(engine_module, "RECORD_DELAY", 60)
    monkeypatch.setattr(engine_module, "ACK_DELAY", 60)
    a, b, frame = await _a_message_from_alice_to_bob(alice, bob)
    await b.send_json_to({"type": "ack", "up_to_seq": frame["seq"]})
    await asyncio.sleep(0.05)
    await b.disconnect()
    await _until_status(bob, 1, "acked", "ack waited for ACK_DELAY")
    await a.disconnect()


async def test_a_closing_socket_has_its_delivered_marks_written_at_once(alice, bob, monkeypatch):
    monkeypatch.setattr(engine_module, "RECORD_DELAY", 60)
    a, b, _ = await _a_message_from_alice_to_bob(alice, bob)
    await b.disconnect()
    await _until_status(bob, 1, "delivered", "mark waited for RECORD_DELAY")
    await a.disconnect()


def test_each_event_loop_has_an_engine_of_its_own():
    async def twice():
        return engine(), engine()

    first, again = asyncio.run(twice())
    assert first is again
    later, _ = asyncio.run(twice())
    assert later is not first


async def test_the_writer_checks_its_connection_once_a_second_and_after_a_failed_batch(
    alice, bob, monkeypatch
):
    checks = []
    monkeypatch.setattr(
        engine_module, "close_old_connections", lambda: checks.append(threading.get_ident())
    )
    writer = engine()
    for n in range(5):
        await writer.send(outgoing(alice, "bob", n))
    assert len(checks) == 1
    failing = batch.write_batch

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(batch, "write_batch", failing)
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(batch, "write_batch", fail_once)
    with pytest.raises(OperationalError):
        await writer.send(outgoing(alice, "bob", "lost"))
    await writer.send(outgoing(alice, "bob", "after"))
    assert len(checks) == 2  # the batch after the failure checked first


def _rows_read(plan: dict) -> int:
    """The most rows any node of an EXPLAIN ANALYZE plan read (all its loops): those it produced
    and those its filter dropped."""
    own = (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)) * plan.get(
        "Actual Loops", 1
    )
    return max([own, *(_rows_read(child) for child in plan.get("Plans", ()))])


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's cached plans")
def test_the_writers_statements_read_one_recipient_whatever_the_tables_held_when_planned(
    alice, bob, carol
):
    # The writer prepares its statements on tables that are still nearly empty...
    sent = batch.write_batch([outgoing(alice, "bob", 0, client_id="first")], [], {}).sends
    batch.write_batch([outgoing(alice, "bob", 1)], [], {bob.agent.pk: [1]})
    batch.write_batch([], [batch.Ack(bob.agent.pk, up_to_seq=2, answer=False)], {})
    assert sent[0].status == "queued"
    # ...which then fill: thousands of pending deliveries (and messages) of someone else.
    now = timezone.now()
    messages = Message.objects.bulk_create(
        Message(sender=alice.agent, kind="direct", payload=n, client_id=f"c{n}", created_at=now)
        for n in range(3000)
    )
    Delivery.objects.bulk_create(
        Delivery(message=message, recipient=carol.agent, seq=n + 1)
        for n, message in enumerate(messages)
    )
    # ...and thousands of active agents.
    Agent.objects.bulk_create(Agent(agent_id=f"fleet-{n}", secret_digest="-") for n in range(3000))
    prepared = dict(
        connection.connection.execute("SELECT statement, name FROM pg_prepared_statements")
    )

    def rows_read(cursor, statement: str, arguments: str) -> int:
        """Run a prepared statement of the writer's; the most rows a step of it read."""
        numbers = iter(range(1, 100))
        name = prepared[re.sub(r"%[sb]", lambda _: f"${next(numbers)}", statement)]
        cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name} ({arguments})")
        [[[explained]]] = cursor.fetchall()
        return _rows_read(explained["Plan"])

    def deliveries_read() -> int:
        """Entries of the deliveries' table and indexes this server has read so far."""
        return _deliveries_statistic(
            "seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables WHERE relname = %s"
        )

    # A delivered mark and an ack for bob's one pending delivery.
    batch.write_batch([outgoing(alice, "bob", 2)], [], {})
    before = deliveries_read()
    batch.write_batch([], [], {bob.agent.pk: [3]})
    batch.write_batch([], [batch.Ack(bob.agent.pk, up_to_seq=3, answer=False)], {})
    ack_and_mark = deliveries_read() - before

    sql = batch._statements("postgresql")
    # One transaction, rolled back at the end (a rollback makes psycopg drop what it prepared).
    with transaction.atomic(), connection.cursor() as cursor:
        read = (
            rows_read(cursor, sql.stored_client_ids_any, f"'{{{alice.agent.pk}}}', '{{x}}'"),
            rows_read(cursor, sql.active_agents_any, "'{bob}'"),
        )
        transaction.set_rollback(True)
    # Nothing of the others' deliveries (joined with the table, the ack and the mark read 6,002),
    # alice's 3,000 messages or the agents: bob's one delivery, once by each, and the value
    # looked up.
    assert (ack_and_mark, read) == (2, (1, 1))
