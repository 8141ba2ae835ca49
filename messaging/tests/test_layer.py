"""The channel layer's receive for this process's channels: one reader, one future per waiter;
and a socket's consumer waiting on it and on daphne's input queue without a task per source."""

import asyncio
import json

import pytest
from channels.layers import get_channel_layer

from mcp_project.asgi import application
from messaging.layer import ChannelLayer
from ops.lean_server import InputQueue


@pytest.fixture
def layer() -> ChannelLayer:
    layer = get_channel_layer()
    assert isinstance(layer, ChannelLayer)
    return layer


async def test_each_waiting_channel_gets_its_own_messages(layer):
    channels = [await layer.new_channel() for _ in range(3)]
    waiting = [asyncio.ensure_future(layer.receive(channel)) for channel in channels]
    await asyncio.sleep(0.05)
    for number, channel in reversed(list(enumerate(channels))):
        await layer.send(channel, {"type": "test.message", "n": number})
    received = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert [message["n"] for message in received] == [0, 1, 2]


async def test_messages_arriving_between_receives_are_kept_in_order(layer):
    busy, other = await layer.new_channel(), await layer.new_channel()
    # `other` keeps the reader running while `busy` is not waiting (handling a message, say).
    other_waits = asyncio.ensure_future(layer.receive(other))
    await asyncio.sleep(0.05)
    for n in range(3):
        await layer.send(busy, {"type": "test.message", "n": n})
    await layer.send(other, {"type": "test.message", "n": "other"})
    assert (await asyncio.wait_for(other_waits, 5))["n"] == "other"
    assert [(await asyncio.wait_for(layer.receive(busy), 5))["n"] for _ in range(3)] == [0, 1, 2]


async def test_waiting_sockets_cost_a_future_each_not_tasks(layer):
    before = len(asyncio.all_tasks())
    channels = [await layer.new_channel() for _ in range(50)]
    waiting = [asyncio.ensure_future(layer.receive(channel)) for channel in channels]
    await asyncio.sleep(0.05)
    # The 50 receives themselves, and one reader for all of them (channels-redis: 2 per waiter).
    assert len(asyncio.all_tasks()) - before == 50 + 1
    await layer.send(channels[7], {"type": "test.message"})
    assert await asyncio.wait_for(waiting[7], 5) == {"type": "test.message"}
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_the_reader_stops_once_nobody_waits_and_a_later_receive_starts_it_again(
    layer, monkeypatch
):
    monkeypatch.setattr(ChannelLayer, "READER_LINGER", 0.05)
    channel = await layer.new_channel()
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.05)
    reader = layer._reader
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await asyncio.sleep(0.2)
    assert reader.cancelled() and layer._reader is None
    # A cut-short pop loses nothing: the message sent now is there for the next receive.
    await layer.send(channel, {"type": "test.message", "n": 1})
    assert (await asyncio.wait_for(layer.receive(channel), 5))["n"] == 1


async def test_a_channel_waited_on_twice_is_refused(layer):
    channel = await layer.new_channel()
    first = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="already has a receive waiting"):
        await layer.receive(channel)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def test_group_sends_reach_local_channels(layer):
    channels = [await layer.new_channel() for _ in range(2)]
    for channel in channels:
        await layer.group_add("agents", channel)
    waiting = [asyncio.ensure_future(layer.receive(channel)) for channel in channels]
    await layer.group_send("agents", {"type": "test.message", "to": "all"})
    received = await asyncio.wait_for(asyncio.gather(*waiting), 5)
    assert received == [{"type": "test.message", "to": "all"}] * 2


@pytest.mark.django_db(transaction=True)
async def test_an_idle_socket_waits_on_futures_without_tasks_of_its_own(alice):
    # daphne hands each socket an InputQueue (ops/lean_server.py); the consumer waits on it and
    # on the channel layer with a future each, where Channels runs a task per source.
    events, sent = InputQueue(), asyncio.Queue()
    scope = {
        "type": "websocket",
        "path": "/ws/agent/",
        "query_string": b"",
        "headers": alice.ws_headers,
        "subprotocols": [],
        "client": ["127.0.0.1", 50000],
        "server": ["testserver", 80],
    }
    socket = asyncio.ensure_future(application(scope, events.get, sent.put))
    events.put_nowait({"type": "websocket.connect"})
    assert (await asyncio.wait_for(sent.get(), 10))["type"] == "websocket.accept"
    welcome = json.loads((await asyncio.wait_for(sent.get(), 10))["text"])
    assert welcome["type"] == "welcome"
    await asyncio.sleep(0.1)
    waiting_on = {
        task.get_coro().__qualname__ for task in asyncio.all_tasks() if task is not socket
    }
    assert not waiting_on & {"InputQueue.get", "ChannelLayer.receive", "await_many_dispatch"}
    events.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(socket, 10)
