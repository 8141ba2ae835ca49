"""Graceful restart: on SIGTERM every agent socket closes with 1012 and nothing accepted is lost."""

import asyncio
import signal
import threading
import time

import pytest
from channels.db import database_sync_to_async
from django.db import connection

from messaging import batch
from messaging.engine import engine
from messaging.models import Delivery
from messaging.tests.conftest import closed_with, communicator_for, connect
from ops import shutdown
from tests.e2e.harness import AgentSocket, Hub, embedded_redis

CLOSE_RESTARTING = 1012


@pytest.fixture
def not_draining(monkeypatch):
    # drain() marks the process as shutting down; the next test runs in a live one again.
    monkeypatch.setattr(shutdown, "draining", False)


@pytest.mark.django_db(transaction=True)
async def test_drain_closes_every_live_socket_with_1012_and_then_stops(alice, bob, not_draining):
    a, _ = await connect(alice)
    b, _ = await connect(bob)
    stopped = asyncio.Event()
    drain = asyncio.ensure_future(shutdown.drain(grace=5, stop=stopped.set))

    assert await closed_with(a) == CLOSE_RESTARTING
    assert await closed_with(b) == CLOSE_RESTARTING
    assert not stopped.is_set()  # the sockets have not finished closing yet
    # The agents answer the close, as a WebSocket client does.
    await a.disconnect(code=CLOSE_RESTARTING)
    await b.disconnect(code=CLOSE_RESTARTING)

    assert await asyncio.wait_for(drain, 5) == 2
    assert stopped.is_set()
    assert shutdown.draining
    assert not shutdown.live_consumers


@pytest.mark.django_db(transaction=True)
async def test_drain_stores_what_the_sockets_left_queued_before_it_stops(alice, bob, not_draining):
    send = batch.Outgoing(sender=alice.agent, kind="direct", payload=1, to="bob")
    [accepted] = (await database_sync_to_async(batch.write_batch)([send], [], {})).sends
    # A frame written just before the end: its delivered mark waits for the writer.
    engine().mark_delivered(bob.agent.pk, [1])

    def statuses():
        try:
            rows = Delivery.objects.filter(message_id=accepted.message_id)
            return list(rows.values_list("status", flat=True))
        finally:
            connection.close()

    seen_at_stop = []

    def stop():
        # What the database holds at the moment the reactor would stop (read from a thread of
        # its own: this one runs the event loop).
        reader = threading.Thread(target=lambda: seen_at_stop.extend(statuses()))
        reader.start()
        reader.join()

    await shutdown.drain(grace=0, stop=stop)
    assert seen_at_stop == ["delivered"]


@pytest.mark.django_db(transaction=True)
async def test_drain_stops_after_the_grace_period_when_a_socket_never_finishes(alice, not_draining):
    a, _ = await connect(alice)
    stopped = asyncio.Event()
    started = time.monotonic()
    await shutdown.drain(grace=0.3, stop=stopped.set)
    assert stopped.is_set()
    assert 0.3 <= time.monotonic() - started < 5
    assert await closed_with(a) == CLOSE_RESTARTING
    await a.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_socket_accepted_while_draining_is_sent_elsewhere_at_once(alice, monkeypatch):
    monkeypatch.setattr(shutdown, "draining", True)
    a = communicator_for(alice)
    connected, _ = await a.connect()
    assert connected
    assert await closed_with(a) == CLOSE_RESTARTING
    await a.disconnect(code=CLOSE_RESTARTING)


requires_redis = pytest.mark.skipif(
    embedded_redis.find_redis_server() is None, reason="no redis-server to start"
)


@pytest.mark.e2e
@requires_redis
async def test_sigterm_on_a_daphne_server_closes_with_1012_and_loses_nothing_accepted():
    with Hub(servers=2, env={"HUB_LOG_LEVEL": "WARNING", "HUB_SHUTDOWN_GRACE_SECONDS": "5"}) as hub:
        alice, bob = hub.register("alice"), hub.register("bob")
        sender = await AgentSocket.connect(hub.ws_url(1), alice.access)
        on_web1 = await AgentSocket.connect(hub.ws_url(0), bob.access)
        first = [await sender.send_to("bob", {"n": n}) for n in range(20)]
        await on_web1.wait_messages(20)  # received, not acknowledged

        started = time.monotonic()
        hub.servers[0].signal(signal.SIGTERM)
        assert await on_web1.wait_closed(timeout=5) == CLOSE_RESTARTING
        closed_after = time.monotonic() - started
        assert hub.servers[0].proc.wait(timeout=10) == 0
        exited_after = time.monotonic() - started

        # Accepted while bob has nowhere to be: stored, waiting for him.
        later = [await sender.send_to("bob", {"n": n}) for n in range(20, 30)]
        assert all(answer["type"] == "accepted" for answer in first + later)

        # Bob reconnects to the other server, as the 1012 asks him to.
        on_web2 = await AgentSocket.connect(hub.ws_url(1), bob.access)
        assert on_web2.welcome["pending"] == 30
        frames = await on_web2.wait_messages(30)
        assert [frame["message_id"] for frame in frames] == [
            answer["message_id"] for answer in first + later
        ]
        assert [frame["seq"] for frame in frames] == list(range(1, 31))
        assert [frame["redelivered"] for frame in frames] == [True] * 20 + [False] * 10

        # web1 recorded its sessions as closed before it exited: none is left open in the database.
        metrics = hub.http("GET", "/metrics", server=1).body
        assert 'hub_sessions_open{server="web1"}' not in metrics
        assert 'hub_sessions_open{server="web2"} 2.0' in metrics
        await sender.close()
        await on_web2.close()
    print(f"\n1012 after {closed_after * 1000:.0f} ms, process exited after {exited_after:.2f} s")
