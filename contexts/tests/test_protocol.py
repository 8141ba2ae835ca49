"""Watch frames and matching: pure functions, no I/O."""

import pytest

from contexts import protocol
from messaging.protocol import ProtocolError, parse_frame

ENTRY = {
    "context_id": "c1",
    "agent_id": "bob",
    "context_type": "task_result",
    "key": "status",
    "tags": ["job-1", "env:prod"],
}


def parse(frame: dict) -> dict:
    import orjson

    return parse_frame(orjson.dumps(frame), max_frame_bytes=10_000, max_payload_bytes=10_000)


def test_the_app_registers_the_watch_frames():
    parsed = parse({"type": "watch", "ref": "r", "tag": "job-1", "unknown": "ignored"})
    assert parsed == {"type": "watch", "ref": "r", "filters": {"tag": "job-1"}}
    assert parse({"type": "unwatch", "watch_id": "w1"})["watch_id"] == "w1"


def test_a_watch_without_filters_watches_everything():
    assert parse({"type": "watch"})["filters"] == {}
    assert protocol.Watch("w1", {}).matches(ENTRY)


@pytest.mark.parametrize(
    "filters, matches",
    [
        ({"context_type": "task_result"}, True),
        ({"context_type": "error"}, False),
        ({"agent_id": "bob"}, True),
        ({"agent_id": "alice"}, False),
        ({"tag": "env:prod"}, True),
        ({"tag": "env"}, False),
        ({"key": "status"}, True),
        ({"key": "stat"}, False),
        ({"agent_id": "bob", "tag": "job-1", "key": "status"}, True),
        ({"agent_id": "bob", "tag": "job-2"}, False),
    ],
)
def test_a_watch_matches_every_filter(filters, matches):
    assert protocol.Watch("w1", filters).matches(ENTRY) is matches


def test_a_watch_skips_types_the_agent_may_not_read():
    watch = protocol.Watch("w1", {}, readable=frozenset({"error"}))
    assert not watch.matches(ENTRY)


def test_routes_name_safe_groups():
    assert protocol.Watch("w1", {}).route == "all"
    assert protocol.Watch("w1", {"context_type": "error"}).route == "error"
    assert protocol.context_group("all") == "ctx.all"
    assert protocol.context_group("error") == "ctx.type.error"
    with pytest.raises(ValueError):
        protocol.context_group("évil group")


@pytest.mark.parametrize(
    "frame, field",
    [
        ({"type": "watch", "context_type": "nope"}, "context_type"),
        ({"type": "watch", "agent_id": "UPPER"}, "agent_id"),
        ({"type": "watch", "tag": ""}, "tag"),
        ({"type": "watch", "key": ["k"]}, "key"),
        ({"type": "unwatch", "watch_id": ""}, "watch_id"),
        ({"type": "unwatch", "watch_id": "w" * 33}, "watch_id"),
    ],
)
def test_bad_watch_frames_raise_naming_the_field(frame, field):
    with pytest.raises(ProtocolError) as caught:
        parse({**frame, "ref": "r"})
    assert caught.value.code == "invalid_frame"
    assert caught.value.extra["field"] == field
    assert caught.value.ref == "r"


def test_context_frames_carry_the_event_the_watch_and_the_version():
    frame = protocol.context_frame(event="updated", watch_id="w2", entry=ENTRY, version=4)
    assert frame == {
        "type": "context",
        "event": "updated",
        "watch_id": "w2",
        "entry": ENTRY,
        "version": 4,
    }
