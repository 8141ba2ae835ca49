"""Reliable delivery without faults: offline recipients, acknowledgements, idempotent sends."""

import asyncio

import pytest

from .harness import AgentSocket

pytestmark = pytest.mark.e2e

# More than the consumer replays in one page (REPLAY_PAGE = 500), so paging is exercised too.
OFFLINE_BACKLOG = 620


async def send_many(sock: AgentSocket, to: str, count: int, *, window: int = 50) -> list[dict]:
    """Send `count` numbered messages, up to `window` in flight, and return the answers in order."""
    answers = []
    pending = []
    for n in range(count):
        pending.append(
            await sock.send_frame({"type": "send", "to": to, "payload": {"n": n}, "ref": f"m{n}"})
        )
        if len(pending) >= window:
            answers.append(await asyncio.wait_for(pending.pop(0), 20))
    for future in pending:
        answers.append(await asyncio.wait_for(future, 20))
    return answers


async def test_a_recipient_offline_for_the_whole_send_gets_everything_in_order_on_connect(hub):
    sender, recipient = hub.register(), hub.register()
    async with await AgentSocket.connect(hub.ws_url(0), sender.access) as s:
        answers = await send_many(s, recipient.agent_id, OFFLINE_BACKLOG)
    assert {a["type"] for a in answers} == {"accepted"}
    assert {a["status"] for a in answers} == {"queued"}

    async with await AgentSocket.connect(hub.ws_url(1), recipient.access) as r:
        assert r.welcome["pending"] == OFFLINE_BACKLOG
        messages = await r.wait_messages(OFFLINE_BACKLOG, timeout=30)
        assert [m["payload"]["n"] for m in messages] == list(range(OFFLINE_BACKLOG))
        assert [m["seq"] for m in messages] == list(range(1, OFFLINE_BACKLOG + 1))
        assert [m["message_id"] for m in messages] == [a["message_id"] for a in answers]
        assert not any(m["redelivered"] for m in messages)


async def test_only_unacknowledged_messages_come_again_marked_redelivered(hub):
    sender, recipient = hub.register(), hub.register()
    async with await AgentSocket.connect(hub.ws_url(0), sender.access) as s:
        async with await AgentSocket.connect(hub.ws_url(1), recipient.access) as r:
            for n in range(10):
                await s.send_to(recipient.agent_id, {"n": n})
            first = await r.wait_messages(10)
            assert not any(m["redelivered"] for m in first)
            acked = await r.ack([m["message_id"] for m in first[:5]])
            assert acked["acked"] == 5

        # Reconnect on the other server: only the unacknowledged half is pending.
        async with await AgentSocket.connect(hub.ws_url(0), recipient.access) as r:
            assert r.welcome["pending"] == 5
            again = await r.wait_messages(5)
            assert [m["message_id"] for m in again] == [m["message_id"] for m in first[5:]]
            assert [m["seq"] for m in again] == [6, 7, 8, 9, 10]
            assert all(m["redelivered"] for m in again)

            # Anything else pending would arrive before a message sent now.
            marker = await s.send_to(recipient.agent_id, "marker")
            await r.wait_messages(6)
            assert [m["message_id"] for m in r.messages] == [
                *(m["message_id"] for m in again),
                marker["message_id"],
            ]
            assert r.messages[-1]["redelivered"] is False


async def test_one_client_id_sent_concurrently_from_two_servers_makes_one_message(hub):
    sender, recipient = hub.register(), hub.register()
    rounds = 15
    async with (
        await AgentSocket.connect(hub.ws_url(0), sender.access) as on_a,
        await AgentSocket.connect(hub.ws_url(1), sender.access) as on_b,
        await AgentSocket.connect(hub.ws_url(1), recipient.access) as r,
    ):
        for n in range(rounds):
            frame = {
                "type": "send",
                "to": recipient.agent_id,
                "payload": {"n": n},
                "id": f"same-{n}",
            }
            answers = await asyncio.gather(on_a.call(frame), on_b.call(frame))
            assert {a["type"] for a in answers} == {"accepted"}, answers
            assert answers[0]["message_id"] == answers[1]["message_id"]
            assert sorted(a["duplicate"] for a in answers) == [False, True]
            # A third try after both answered is a plain duplicate.
            third = await on_b.call(frame)
            assert third["message_id"] == answers[0]["message_id"] and third["duplicate"] is True

        # Sent after all the rest committed, so every earlier delivery comes before it.
        marker = await on_a.send_to(recipient.agent_id, "marker")
        await r.wait_messages(1, predicate=lambda m: m["message_id"] == marker["message_id"])
        payloads = [m["payload"] for m in r.messages]
        assert payloads == [{"n": n} for n in range(rounds)] + ["marker"]
        assert len({m["message_id"] for m in r.messages}) == rounds + 1
