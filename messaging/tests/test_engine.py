"""engine(): one engine per event loop, found again without asking asyncio each time."""

import asyncio
import threading

from agents.models import Agent
from messaging import batch
from messaging.engine import engine


async def current_engine():
    return engine()


async def test_the_engine_is_found_without_a_system_call_once_known(loop_lookups):
    first = engine()
    loop_lookups.clear()
    assert engine() is first and engine() is first
    assert loop_lookups == []  # each call made a getpid system call (Python 3.11)


def test_each_loop_has_its_own_engine_in_turn_and_side_by_side():
    one, two = asyncio.run(current_engine()), asyncio.run(current_engine())
    assert one is not two  # one loop after another in a thread
    beside = []
    loop_started, done = threading.Event(), threading.Event()

    async def hold():
        beside.append(engine())
        loop_started.set()
        await asyncio.get_running_loop().run_in_executor(None, done.wait)

    thread = threading.Thread(target=asyncio.run, args=(hold(),))
    thread.start()
    loop_started.wait(5)
    try:
        mine = asyncio.run(current_engine())  # while the other thread's loop runs
        assert mine is not beside[0] and mine is not two
    finally:
        done.set()
        thread.join(5)


class _Socket:
    def __init__(self, pk, written):
        self.channel_name, self._written = f"agent-{pk}", written
        self.agent = Agent(pk=pk)

    def deliver_local(self, frames):
        self._written += [f"{self.channel_name} gets {frame['seq']}" for frame in frames]


def _answered_batch(written, batches):
    """Answer batches of (sender pk, recipient pk, ...) sends from the writer as
    `Engine._answer` does; what the sockets of agents 1-3 were handed, in order."""

    async def answer():
        hub = engine()
        for pk in (1, 2, 3):
            hub.attach(_Socket(pk, written))
        for number, pairs in enumerate(batches):
            sends = []
            for sender, *_ in pairs:
                future = asyncio.get_running_loop().create_future()
                future.add_done_callback(
                    lambda _, sender=sender: written.append(f"agent-{sender} accepted")
                )
                sends.append(
                    (batch.Outgoing(sender=Agent(pk=sender), kind="direct", payload=0), future)
                )
            frames = {}
            for _, *recipients in pairs:
                for recipient in recipients:
                    frames.setdefault(recipient, []).append({"seq": number})
            channels = {pk: [f"agent-{pk}"] for pk in frames}
            outcome = batch.BatchResult([object()] * len(pairs), [], frames, channels)
            hub._answer(sends, [], outcome)
        await asyncio.sleep(0.01)

    asyncio.run(answer())
    return written


def test_recipients_that_sent_nothing_get_their_frames_before_the_senders_hear_accepted():
    assert _answered_batch([], [[(1, 2), (2, 1), (1, 3)]]) == [
        "agent-3 gets 0",  # sent nothing in the batch
        "agent-1 accepted",
        "agent-2 accepted",
        "agent-1 accepted",
        # a socket that sent reads its `accepted` before a message in the same batch
        "agent-2 gets 0",
        "agent-1 gets 0",
    ]


def test_a_recipients_frames_keep_commit_order_behind_a_batch_still_routing():
    # The first batch's frames for agent 2, a sender in it, wait for the accepted callbacks;
    # the second batch's for agent 2 go behind them, though agent 2 sent nothing in it.
    assert _answered_batch([], [[(2, 2)], [(1, 2)]]) == [
        "agent-2 accepted",
        "agent-2 gets 0",
        "agent-1 accepted",
        "agent-2 gets 1",
    ]


def test_a_batch_that_fans_out_answers_its_senders_first():
    # One send to two recipients: its sender, whose next sends may wait for `accepted`, first.
    assert _answered_batch([], [[(1, 2, 3)]]) == [
        "agent-1 accepted",
        "agent-2 gets 0",
        "agent-3 gets 0",
    ]
