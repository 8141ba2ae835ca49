"""The change stream on the agent socket: watch, unwatch, filters and context frames."""

import asyncio

import pytest

from contexts.tasks import purge_expired_contexts

from .conftest import (
    connect,
    context_frames,
    detail_url,
    expire,
    if_match,
    in_db,
    request,
    watch,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("release_db_connections"),
]


@pytest.fixture
def write(share, as_agent):
    """Async helpers that change entries through REST, as agents do."""

    class Writer:
        async def create(self, credentials, **fields):
            return (await in_db(share)(credentials, **fields)).json()

        async def patch(self, credentials, entry, version, **fields):
            def call():
                return as_agent(credentials).patch(
                    detail_url(entry["context_id"]),
                    fields,
                    format="json",
                    headers=if_match(version),
                )

            response = await in_db(call)()
            assert response.status_code == 200, response.json()
            return response.json()

        async def delete(self, credentials, entry):
            response = await in_db(
                lambda: as_agent(credentials).delete(detail_url(entry["context_id"]))
            )()
            assert response.status_code == 204

    return Writer()


async def test_a_watch_sees_entries_created_updated_and_deleted(alice, bob, write):
    socket = await connect(alice)
    watch_id = await watch(socket)
    entry = await write.create(bob, context_type="task_result", payload={"n": 1})
    await write.patch(bob, entry, 1, payload={"n": 2})
    await write.delete(bob, entry)
    created, updated, deleted = await context_frames(socket, 3)
    assert created["event"] == "created" and created["version"] == 1
    assert created["watch_id"] == watch_id
    assert created["entry"] == entry
    assert updated["event"] == "updated" and updated["version"] == 2
    assert updated["entry"]["payload"] == {"n": 2}
    assert deleted["event"] == "deleted" and deleted["version"] == 2
    assert deleted["entry"]["context_id"] == entry["context_id"]
    await socket.disconnect()


async def test_watching_answers_with_the_ref_and_the_filters(alice):
    socket = await connect(alice)
    answer = await request(
        socket, {"type": "watch", "ref": "r-9", "context_type": "error", "tag": "job-1"}
    )
    assert answer == {
        "type": "watching",
        "ref": "r-9",
        "watch_id": answer["watch_id"],
        "filters": {"context_type": "error", "tag": "job-1"},
    }
    await socket.disconnect()


@pytest.mark.parametrize(
    "filters, matching, other",
    [
        ({"context_type": "error"}, {"context_type": "error"}, {"context_type": "metadata"}),
        ({"agent_id": "bob"}, {}, {"_writer": "carol"}),
        ({"tag": "job-1"}, {"tags": ["x", "job-1"]}, {"tags": ["job-2"]}),
        ({"key": "status"}, {"key": "status"}, {"key": "other"}),
        (
            {"context_type": "state_update", "agent_id": "bob", "key": "status"},
            {"context_type": "state_update", "key": "status"},
            {"context_type": "state_update", "key": "status", "_writer": "carol"},
        ),
    ],
)
async def test_a_watch_passes_only_matching_changes(
    alice, bob, carol, write, filters, matching, other
):
    writers = {"bob": bob, "carol": carol}
    socket = await connect(alice)
    await watch(socket, **filters)
    other_writer = writers[other.pop("_writer", "bob")]
    await write.create(other_writer, **other)
    match = await write.create(bob, **matching)
    (frame,) = await context_frames(socket, 1)
    assert frame["entry"]["context_id"] == match["context_id"]
    assert await socket.receive_nothing(timeout=0.3)
    await socket.disconnect()


async def test_overlapping_watches_each_get_one_frame(alice, bob, write):
    socket = await connect(alice)
    everything = await watch(socket)
    errors = await watch(socket, context_type="error")
    await write.create(bob, context_type="error")
    frames = await context_frames(socket, 2)
    assert sorted(frame["watch_id"] for frame in frames) == sorted([everything, errors])
    await write.create(bob, context_type="metadata")
    (frame,) = await context_frames(socket, 1)
    assert frame["watch_id"] == everything
    assert await socket.receive_nothing(timeout=0.3)
    await socket.disconnect()


async def test_a_socket_without_watches_gets_no_context_frames(alice, bob, write):
    socket = await connect(alice)
    await write.create(bob)
    assert await socket.receive_nothing(timeout=0.3)
    await socket.disconnect()


async def test_unwatch_stops_the_frames(alice, bob, write):
    socket = await connect(alice)
    watch_id = await watch(socket, context_type="metadata")
    answer = await request(socket, {"type": "unwatch", "watch_id": watch_id, "ref": "u"})
    assert answer == {"type": "unwatched", "ref": "u", "watch_id": watch_id}
    await write.create(bob, context_type="metadata")
    assert await socket.receive_nothing(timeout=0.3)
    await socket.disconnect()


async def test_unwatching_one_of_two_watches_on_a_route_keeps_the_other(alice, bob, write):
    socket = await connect(alice)
    first = await watch(socket, context_type="error")
    second = await watch(socket, context_type="error", agent_id="bob")
    await request(socket, {"type": "unwatch", "watch_id": first})
    await write.create(bob, context_type="error")
    (frame,) = await context_frames(socket, 1)
    assert frame["watch_id"] == second
    await socket.disconnect()


async def test_an_unknown_watch_id_is_an_error_and_the_socket_stays_open(alice):
    socket = await connect(alice)
    answer = await request(socket, {"type": "unwatch", "watch_id": "w404", "ref": "x"})
    assert answer["type"] == "error" and answer["code"] == "invalid_frame"
    assert answer["field"] == "watch_id" and answer["ref"] == "x"
    assert (await request(socket, {"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await socket.disconnect()


@pytest.mark.parametrize(
    "frame, field",
    [
        ({"type": "watch", "context_type": "gossip"}, "context_type"),
        ({"type": "watch", "agent_id": 7}, "agent_id"),
        ({"type": "watch", "tag": "has space"}, "tag"),
        ({"type": "watch", "key": "x" * 201}, "key"),
        ({"type": "unwatch"}, "watch_id"),
        ({"type": "unwatch", "watch_id": ["w1"]}, "watch_id"),
    ],
)
async def test_a_malformed_watch_frame_names_the_field(alice, frame, field):
    socket = await connect(alice)
    answer = await request(socket, {**frame, "ref": "bad"})
    assert answer["type"] == "error" and answer["code"] == "invalid_frame", answer
    assert answer["field"] == field and answer["ref"] == "bad"
    await socket.disconnect()


async def test_a_socket_holds_a_limited_number_of_watches(alice, hub_settings):
    hub_settings(CONTEXT_MAX_WATCHES=2)
    socket = await connect(alice)
    await watch(socket)
    await watch(socket, tag="a")
    answer = await request(socket, {"type": "watch", "tag": "b", "ref": "third"})
    assert answer["type"] == "error" and answer["code"] == "too_many_watches"
    assert answer["ref"] == "third"
    await socket.disconnect()


async def test_the_purge_announces_expired_entries_to_watchers(alice, bob, write):
    socket = await connect(alice)
    await watch(socket, agent_id="bob")
    entry = await write.create(bob, context_type="metadata")
    await context_frames(socket, 1)
    await in_db(expire)(entry["context_id"])
    await in_db(purge_expired_contexts)()
    (frame,) = await context_frames(socket, 1)
    assert frame["event"] == "expired"
    assert frame["entry"]["context_id"] == entry["context_id"]
    await socket.disconnect()


async def test_watches_outlive_the_layers_group_expiry(alice, bob, write, settings, hub_settings):
    """channels-redis drops group members after group_expiry; the socket re-joins in time (P3)."""
    layers = {alias: {**config} for alias, config in settings.CHANNEL_LAYERS.items()}
    if "CONFIG" not in layers["default"]:
        pytest.skip("only the Redis layer expires group members")
    layers["default"]["CONFIG"] = {**layers["default"]["CONFIG"], "group_expiry": 2}
    settings.CHANNEL_LAYERS = layers
    hub_settings(GROUP_REFRESH_SECONDS=1)
    socket = await connect(alice)
    await watch(socket)
    await asyncio.sleep(3.2)
    await write.create(bob)
    (frame,) = await context_frames(socket, 1)
    assert frame["event"] == "created"
    await socket.disconnect()
