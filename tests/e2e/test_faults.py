"""Produce under faults, then account for every accepted message.

Each test runs a hub of its own, breaks a part of it mid-run (a server killed with SIGKILL, a
server frozen, Redis restarted or emptied) and then checks what the agents saw: no accepted
message lost, none stored twice, every recipient's messages in order.
"""

import asyncio
import time

import pytest

from .harness import AgentSocket, Receiver, Sender, account, plan_round_robin

pytestmark = pytest.mark.e2e

# Redeliveries are expected here; dead-lettering after a few attempts is a separate policy.
FAULT_ENV = {"HUB_MAX_DELIVERY_ATTEMPTS": "1000"}
# The sweeps run every second and replay anything unacknowledged for a second or more.
FAST_SWEEPS = {"HUB_SWEEP_INTERVAL": "1", "HUB_REDELIVERY_DELAY": "1"}


async def wait_until(condition, *, timeout: float, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def make_agents(
    hub, *, senders: int, receivers: int, total: int, sender_server: int, receiver_server: int, **kw
):
    """Register senders and receivers and plan `total` messages between them, sent round-robin."""
    sender_creds = [hub.register(f"sender-{i}") for i in range(senders)]
    receiver_creds = [hub.register(f"receiver-{i}") for i in range(receivers)]
    plans = plan_round_robin(
        [c.agent_id for c in sender_creds], [c.agent_id for c in receiver_creds], total
    )
    the_senders = [Sender(hub, c, sender_server, plans[c.agent_id], **kw) for c in sender_creds]
    the_receivers = [Receiver(hub, c, receiver_server) for c in receiver_creds]
    return the_senders, the_receivers


async def drain(senders, receivers, *, timeout: float) -> float:
    """Wait until every accepted message reached its recipient; return how long that took."""
    started = time.monotonic()
    for receiver in receivers:
        wanted = {
            answer["message_id"]
            for sender in senders
            for planned in sender.plan
            if planned.to == receiver.agent_id
            and (answer := sender.accepted.get(planned.client_id))
        }
        await receiver.wait_for(wanted, timeout=max(0.1, timeout - (time.monotonic() - started)))
    return time.monotonic() - started


def assert_every_accepted_message_arrived_once_in_order(senders, receivers, total):
    result = account(senders, receivers)
    assert result.accepted == total, result.summary()
    assert result.lost == [], result.summary()
    assert result.unexpected == [], result.summary()
    assert result.stored_twice == [], result.summary()
    assert result.seq_disorder == [], result.summary()
    assert result.pair_disorder == [], result.summary()
    return result


# Generous: the run takes about a minute alone on two cores, several under a loaded machine.
@pytest.mark.timeout(600)
async def test_no_accepted_message_is_lost_when_a_server_is_killed_mid_run(
    make_hub, record_property
):
    total = 3000
    hub = make_hub(servers=2, env=FAULT_ENV)
    senders, receivers = make_agents(
        hub, senders=3, receivers=3, total=total, sender_server=0, receiver_server=1, window=30
    )
    for receiver in receivers:
        receiver.start()
    await wait_until(lambda: all(r.welcomes for r in receivers), timeout=10)

    started = time.monotonic()
    sending = asyncio.gather(*(s.run() for s in senders))
    await wait_until(lambda: sum(len(s.accepted) for s in senders) >= total // 3, timeout=120)
    hub.kill_server(1)
    killed_at = sum(len(s.accepted) for s in senders)
    await asyncio.to_thread(hub.start_server, 1)
    await asyncio.wait_for(sending, 480)
    send_seconds = max(s.done_at for s in senders) - started

    drain_seconds = await drain(senders, receivers, timeout=60)
    for receiver in receivers:
        await receiver.stop()

    result = assert_every_accepted_message_arrived_once_in_order(senders, receivers, total)
    # The receivers really lost their sockets and came back to a backlog kept while they were away.
    assert all(len(r.welcomes) >= 2 for r in receivers), [len(r.welcomes) for r in receivers]
    assert any(w["pending"] > 0 for r in receivers for w in r.welcomes[1:])
    assert [s.errors for s in senders] == [[], [], []]

    rate = total / send_seconds
    record_property("messages_per_second", round(rate, 1))
    print(
        f"\nkill -9 run: {total} messages accepted in {send_seconds:.1f} s ({rate:.0f}/s), "
        f"server killed after {killed_at} accepted, all delivered {drain_seconds:.1f} s after the "
        f"last accept; {result.summary()}"
    )


@pytest.mark.timeout(180)
async def test_a_slow_reader_gets_a_burst_over_the_channel_capacity_in_order(make_hub):
    burst = 300
    hub = make_hub(
        servers=2, env={**FAULT_ENV, **FAST_SWEEPS, "HUB_CHANNEL_CAPACITY": "10"}, celery=True
    )
    senders, receivers = make_agents(
        hub, senders=3, receivers=1, total=burst, sender_server=0, receiver_server=1, window=30
    )
    [receiver] = receivers
    receiver.read_delay = 0.005
    receiver.start()
    await wait_until(lambda: receiver.welcomes, timeout=10)

    # The reader's server takes nothing off its channel (capacity 10) for a while, so most
    # nudges of the burst are dropped; everything must still arrive from the database, in order.
    # The pause stays well under the channel layer's Redis read timeout, which would end the
    # socket: this test is about a slow reader, not a dead one.
    hub.pause_server(1)
    sending = asyncio.gather(*(s.run() for s in senders))
    try:
        await wait_until(lambda: sum(len(s.accepted) for s in senders) >= 100, timeout=4)
    except TimeoutError:
        pass
    finally:
        hub.resume_server(1)
    overflowed = sum(len(s.accepted) for s in senders)
    await asyncio.wait_for(sending, 120)

    drained = await drain(senders, receivers, timeout=30)
    await receiver.stop()
    result = assert_every_accepted_message_arrived_once_in_order(senders, receivers, burst)
    assert overflowed > 10
    # One session throughout: nothing here was rescued by a reconnect.
    assert len(receiver.welcomes) == 1
    print(
        f"\nslow reader: {overflowed} messages accepted while its server was frozen (capacity 10); "
        f"all {burst} delivered {drained:.1f} s after the last accept; {result.summary()}"
    )


@pytest.mark.timeout(240)
async def test_the_hub_recovers_from_a_redis_restart_and_loses_nothing(make_hub):
    total = 400
    hub = make_hub(servers=2, env={**FAULT_ENV, **FAST_SWEEPS}, celery=True)
    senders, receivers = make_agents(
        hub,
        senders=2,
        receivers=2,
        total=total,
        sender_server=0,
        receiver_server=1,
        window=5,
        pace=0.01,
    )
    for receiver in receivers:
        receiver.start()
    await wait_until(lambda: all(r.welcomes for r in receivers), timeout=10)

    def accepted_ids():
        return {a["message_id"] for s in senders for a in s.accepted.values()}

    def all_received(ids):
        return ids <= set().union(*(r.received_ids() for r in receivers))

    sending = asyncio.gather(*(s.run() for s in senders))
    await wait_until(lambda: sum(len(s.accepted) for s in senders) >= total // 4, timeout=60)
    hub.stop_redis()
    at_stop = len(accepted_ids())
    await asyncio.sleep(1.0)
    before_restart = accepted_ids()
    await asyncio.to_thread(hub.start_redis)
    restarted = time.monotonic()

    # Recovery: sends are accepted again, and everything accepted before the restart arrives.
    await wait_until(lambda: len(accepted_ids()) > len(before_restart), timeout=30)
    sends_back = time.monotonic() - restarted
    await wait_until(lambda: all_received(before_restart), timeout=30)
    backlog_back = time.monotonic() - restarted

    await asyncio.wait_for(sending, 120)
    drained = await drain(senders, receivers, timeout=30)
    for receiver in receivers:
        await receiver.stop()

    result = assert_every_accepted_message_arrived_once_in_order(senders, receivers, total)
    # Both servers kept running: the hub recovered without a restart.
    assert all(server.running for server in hub.servers)
    async with await AgentSocket.connect(hub.ws_url(1), receivers[0].credentials.access) as sock:
        assert sock.welcome["pending"] == 0
    print(
        f"\nredis restart: {len(before_restart) - at_stop} accepted while Redis was down; "
        f"sends accepted again {sends_back:.1f} s and every earlier accepted message "
        f"delivered {backlog_back:.1f} s after Redis came back; the rest delivered {drained:.1f} s "
        f"after the last accept; {result.summary()}"
    )


@pytest.mark.timeout(120)
async def test_sockets_that_outlive_a_redis_data_loss_still_get_messages_and_closes(make_hub):
    hub = make_hub(servers=2, env=FAST_SWEEPS, celery=True)
    sender, alice, bob = hub.register(), hub.register(), hub.register()
    async with (
        await AgentSocket.connect(hub.ws_url(0), sender.access) as s,
        await AgentSocket.connect(hub.ws_url(1), alice.access) as a,
        await AgentSocket.connect(hub.ws_url(1), bob.access) as b,
    ):
        # Every group membership is gone, yet no socket saw an error: nothing reconnects.
        await asyncio.to_thread(hub.flush_redis)
        lost_at = time.monotonic()
        first = [await s.send_to(alice.agent_id, {"n": n}) for n in range(3)]
        await a.wait_messages(3, timeout=15)
        recovered = time.monotonic() - lost_at
        assert [m["message_id"] for m in a.messages] == [x["message_id"] for x in first]

        # Deregistration still closes a socket whose group Redis forgot.
        answer = await asyncio.to_thread(
            hub.http, "DELETE", "/api/v1/agents/me/", server=0, token=bob.access
        )
        assert answer.status == 204
        assert await b.wait_closed(timeout=5) == 4403
        assert not a.closed.is_set() and not s.closed.is_set()
    print(f"\nredis data loss: connected sockets got their messages {recovered:.1f} s later")
