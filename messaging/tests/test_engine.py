"""engine(): one engine per event loop, found again without asking asyncio each time."""

import asyncio
import threading

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
