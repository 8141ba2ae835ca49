"""The pure wire protocol: every client frame type and every way a frame can be refused."""

import json
import uuid
from datetime import UTC, datetime

import pytest

from messaging import protocol
from messaging.protocol import ProtocolError, parse_frame

FRAME_LIMIT = 4096
PAYLOAD_LIMIT = 1024
MESSAGE_ID = "6f1c2b1e-8a37-4f0e-9a55-0d5bb3c2f7a1"


def parse(frame, *, max_frame_bytes=FRAME_LIMIT, max_payload_bytes=PAYLOAD_LIMIT):
    raw = frame if isinstance(frame, str | bytes) else json.dumps(frame)
    return parse_frame(raw, max_frame_bytes=max_frame_bytes, max_payload_bytes=max_payload_bytes)


def refused(frame, **limits) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse(frame, **limits)
    return caught.value


def assert_invalid_field(frame, field, *, ref=None, **limits):
    error = refused(frame, **limits)
    assert error.code == protocol.INVALID_FRAME
    assert error.detail.startswith(f"{field}:"), error.detail
    assert error.frame() == {
        "type": "error",
        "code": "invalid_frame",
        "detail": error.detail,
        "field": field,
        **({"ref": ref} if ref is not None else {}),
    }


# --- Every client frame type, well formed ------------------------------------------------------


def test_it_parses_an_auth_frame():
    assert parse({"type": "auth", "token": "abc"}) == {"type": "auth", "token": "abc", "ref": None}


def test_it_parses_a_send_frame_with_every_option():
    frame = parse(
        {"type": "send", "to": "bob", "payload": {"n": 1}, "id": "c-1", "ttl": 60, "ref": "r1"}
    )
    assert frame == {
        "type": "send",
        "to": "bob",
        "payload": {"n": 1},
        "client_id": "c-1",
        "ttl": 60,
        "ref": "r1",
    }


def test_it_leaves_optional_send_fields_empty():
    frame = parse({"type": "send", "to": "bob", "payload": "hi"})
    assert frame["client_id"] is None and frame["ttl"] is None and frame["ref"] is None


@pytest.mark.parametrize("payload", [None, 0, "text", [1, 2], {"deep": {"er": [True, None]}}])
def test_it_accepts_any_json_payload(payload):
    assert parse({"type": "broadcast", "payload": payload})["payload"] == payload


def test_it_parses_a_broadcast_frame():
    frame = parse({"type": "broadcast", "payload": [1], "ttl": 5.5, "ref": "b"})
    assert frame == {"type": "broadcast", "payload": [1], "client_id": None, "ttl": 5.5, "ref": "b"}


def test_it_parses_a_publish_frame():
    frame = parse({"type": "publish", "topic": "jobs.eu-1_x", "payload": {}})
    assert frame["topic"] == "jobs.eu-1_x" and frame["payload"] == {}


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_it_parses_topic_changes(kind):
    assert parse({"type": kind, "topic": "news", "ref": "s"}) == {
        "type": kind,
        "topic": "news",
        "ref": "s",
    }


def test_it_parses_a_request_to_an_agent():
    frame = parse({"type": "request", "to": "bob", "payload": 1, "timeout": 2.5, "id": "q"})
    assert frame == {
        "type": "request",
        "to": "bob",
        "capability": None,
        "payload": 1,
        "timeout": 2.5,
        "client_id": "q",
        "ref": None,
    }


def test_it_parses_a_request_by_capability():
    frame = parse({"type": "request", "capability": "ocr:v2/fast", "payload": None})
    assert frame["capability"] == "ocr:v2/fast" and frame["to"] is None and frame["timeout"] is None


def test_it_parses_a_reply_into_a_uuid():
    frame = parse({"type": "reply", "in_reply_to": MESSAGE_ID, "payload": {"ok": True}})
    assert frame["in_reply_to"] == uuid.UUID(MESSAGE_ID) and frame["payload"] == {"ok": True}


def test_it_parses_an_ack_by_message_ids():
    frame = parse({"type": "ack", "message_ids": [MESSAGE_ID]})
    assert frame["message_ids"] == [uuid.UUID(MESSAGE_ID)] and frame["up_to_seq"] is None


def test_it_parses_an_ack_up_to_a_seq():
    frame = parse({"type": "ack", "up_to_seq": 42})
    assert frame["up_to_seq"] == 42 and frame["message_ids"] is None


def test_it_parses_a_heartbeat_and_echoes_its_ref():
    assert parse({"type": "heartbeat", "ref": "hb-1"}) == {"type": "heartbeat", "ref": "hb-1"}


def test_it_accepts_a_frame_sent_as_bytes():
    assert parse(b'{"type": "heartbeat"}')["type"] == "heartbeat"


def test_it_lets_another_app_register_a_frame_type(monkeypatch):
    monkeypatch.setitem(protocol.VALIDATORS, "ping", lambda frame, ref: {"n": frame.get("n")})
    assert parse({"type": "ping", "n": 3, "ref": "p"}) == {"type": "ping", "n": 3, "ref": "p"}


# --- invalid_json --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    ["", "{", "not json", '{"type": "send",}', "NaN", "[" * 2000, '"\\ud800"', b"\xff\xfe"],
)
def test_it_answers_invalid_json_for_text_that_is_not_json(raw):
    error = refused(raw)
    assert error.code == protocol.INVALID_JSON
    assert error.frame()["type"] == "error" and "ref" not in error.frame()


def test_it_answers_invalid_json_for_a_lone_surrogate_instead_of_crashing():
    # A str frame can carry code points that have no UTF-8 form; they must not escape as an
    # exception from the size check.
    error = refused('{"type": "heartbeat", "ref": "\ud800"}')
    assert error.code == protocol.INVALID_JSON


# --- invalid_frame, naming the field --------------------------------------------------------------


@pytest.mark.parametrize("raw", ["[]", "1", '"send"', "null", "true"])
def test_it_refuses_a_frame_that_is_not_an_object(raw):
    error = refused(raw)
    assert error.code == protocol.INVALID_FRAME and error.extra["field"] == "type"


@pytest.mark.parametrize("kind", [None, 7, ["send"], {"t": 1}])
def test_it_names_type_when_it_is_missing_or_not_a_string(kind):
    frame = {"payload": 1, "ref": "r"} if kind is None else {"type": kind, "ref": "r"}
    assert_invalid_field(frame, "type", ref="r")


@pytest.mark.parametrize("ref", [5, ["r"], {"r": 1}, "x" * (protocol.MAX_REF + 1)])
def test_it_names_ref_when_it_is_not_a_short_string(ref):
    # The bad ref itself is never echoed back.
    assert_invalid_field({"type": "heartbeat", "ref": ref}, "ref")


def test_it_echoes_a_ref_of_the_maximum_length():
    ref = "r" * protocol.MAX_REF
    assert parse({"type": "heartbeat", "ref": ref})["ref"] == ref


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "auth"}, "token"),
        ({"type": "auth", "token": 1}, "token"),
        ({"type": "auth", "token": "t" * 8193}, "token"),
        ({"type": "send", "payload": 1}, "to"),
        ({"type": "send", "to": "Bob", "payload": 1}, "to"),
        ({"type": "send", "to": "bob\n", "payload": 1}, "to"),
        ({"type": "send", "to": "b" * 65, "payload": 1}, "to"),
        ({"type": "send", "to": "bob"}, "payload"),
        ({"type": "send", "to": "bob", "payload": 1, "id": 7}, "id"),
        ({"type": "send", "to": "bob", "payload": 1, "id": "i" * 129}, "id"),
        ({"type": "send", "to": "bob", "payload": 1, "ttl": 0}, "ttl"),
        ({"type": "send", "to": "bob", "payload": 1, "ttl": "60"}, "ttl"),
        ({"type": "send", "to": "bob", "payload": 1, "ttl": True}, "ttl"),
        ({"type": "send", "to": "bob", "payload": 1, "ttl": protocol.MAX_TTL + 1}, "ttl"),
        ({"type": "broadcast"}, "payload"),
        ({"type": "publish", "payload": 1}, "topic"),
        ({"type": "publish", "topic": "a b", "payload": 1}, "topic"),
        ({"type": "publish", "topic": "t" * 101, "payload": 1}, "topic"),
        ({"type": "publish", "topic": "", "payload": 1}, "topic"),
        ({"type": "subscribe"}, "topic"),
        ({"type": "unsubscribe", "topic": "bad/topic"}, "topic"),
        ({"type": "request", "payload": 1}, "to"),
        ({"type": "request", "to": "bob", "capability": "ocr", "payload": 1}, "to"),
        ({"type": "request", "capability": "-ocr", "payload": 1}, "capability"),
        ({"type": "request", "to": "bob"}, "payload"),
        ({"type": "request", "to": "bob", "payload": 1, "timeout": 0}, "timeout"),
        ({"type": "request", "to": "bob", "payload": 1, "timeout": 3601}, "timeout"),
        ({"type": "reply", "payload": 1}, "in_reply_to"),
        ({"type": "reply", "in_reply_to": "not-a-uuid", "payload": 1}, "in_reply_to"),
        ({"type": "reply", "in_reply_to": MESSAGE_ID}, "payload"),
        ({"type": "ack"}, "message_ids"),
        ({"type": "ack", "message_ids": [], "up_to_seq": 1}, "message_ids"),
        ({"type": "ack", "message_ids": MESSAGE_ID}, "message_ids"),
        ({"type": "ack", "message_ids": ["nope"]}, "message_ids"),
        ({"type": "ack", "message_ids": [17]}, "message_ids"),
        ({"type": "ack", "message_ids": [None]}, "message_ids"),
        ({"type": "ack", "up_to_seq": -1}, "up_to_seq"),
        ({"type": "ack", "up_to_seq": 1.5}, "up_to_seq"),
        ({"type": "ack", "up_to_seq": False}, "up_to_seq"),
        ({"type": "ack", "up_to_seq": "3"}, "up_to_seq"),
    ],
)
def test_it_names_the_field_that_makes_a_frame_invalid(frame, field):
    assert_invalid_field({**frame, "ref": "r-9"}, field, ref="r-9", max_frame_bytes=100_000)


def test_it_limits_an_ack_to_a_thousand_ids():
    ids = [MESSAGE_ID] * (protocol.MAX_ACK_IDS + 1)
    limits = {"max_frame_bytes": 100_000}
    assert len(parse({"type": "ack", "message_ids": ids[:-1]}, **limits)["message_ids"]) == 1000
    error = refused({"type": "ack", "message_ids": ids}, **limits)
    assert error.code == protocol.INVALID_FRAME and error.extra["field"] == "message_ids"


def test_it_accepts_limits_at_their_edges():
    frame = parse({"type": "send", "to": "b" * 64, "payload": 1, "ttl": protocol.MAX_TTL})
    assert frame["ttl"] == protocol.MAX_TTL
    assert parse({"type": "publish", "topic": "t" * 100, "payload": 1})["topic"] == "t" * 100
    assert parse({"type": "request", "to": "b", "payload": 1, "timeout": 0.1})["timeout"] == 0.1


@pytest.mark.parametrize(
    ("raw", "field", "where"),
    [
        ('{"type": "send", "to": "bob", "payload": "a\\u0000b", "ref": "n"}', "payload", "payload"),
        (
            '{"type": "send", "to": "bob", "payload": {"k": [0, "\\u0000"]}}',
            "payload",
            "payload.k.1",
        ),
        ('{"type": "broadcast", "payload": {"\\u0000": 1}}', "payload", "payload.\x00"),
        ('{"type": "send", "to": "bob", "payload": 1, "id": "i\\u0000"}', "id", "id"),
    ],
)
def test_it_refuses_nul_characters_naming_the_field(raw, field, where):
    # PostgreSQL cannot store NUL in text or JSON, so no frame may carry one into the store.
    error = refused(raw)
    assert error.code == protocol.INVALID_FRAME and error.extra["field"] == field
    assert f"(at {where})" in error.detail


def test_it_does_not_echo_a_ref_that_holds_a_nul():
    error = refused('{"type": "heartbeat", "ref": "r\\u0000"}')
    assert error.extra["field"] == "ref" and error.ref is None


def test_it_accepts_an_escaped_backslash_before_u0000():
    frame = parse('{"type": "broadcast", "payload": "C:\\\\u0000"}')
    assert frame["payload"] == "C:\\u0000"


def test_it_finds_a_nul_nested_deeper_than_the_recursion_limit_allows_walking():
    payload = "[" * 1000 + '"\\u0000"' + "]" * 1000
    error = refused('{"type": "broadcast", "payload": ' + payload + "}")
    assert error.extra["field"] == "payload"


# --- unknown_type --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sendd", "SEND", "", "welcome", "error", "frame_send"])
def test_it_answers_unknown_type_and_echoes_the_ref(kind):
    error = refused({"type": kind, "ref": "u1"})
    assert error.code == protocol.UNKNOWN_TYPE
    assert error.frame() == {
        "type": "error",
        "code": "unknown_type",
        "detail": error.detail,
        "ref": "u1",
    }


def test_it_truncates_a_long_unknown_type_in_its_answer():
    error = refused({"type": "x" * 5000}, max_frame_bytes=100_000)
    assert error.code == protocol.UNKNOWN_TYPE and len(error.detail) < 100


# --- payload_too_large ---------------------------------------------------------------------------


def test_it_refuses_a_frame_over_the_frame_limit_before_parsing_it():
    raw = '{"type": "heartbeat", "pad": "' + "x" * FRAME_LIMIT + '"}'
    error = refused(raw)
    assert error.code == protocol.PAYLOAD_TOO_LARGE and "ref" not in error.frame()
    # Nothing was parsed: even broken JSON of that size gets the same answer.
    assert refused("{" * (FRAME_LIMIT + 1)).code == protocol.PAYLOAD_TOO_LARGE


def test_it_measures_the_frame_limit_in_bytes_not_characters():
    # 1500 three-byte characters: 1.5k characters but 4.5k bytes, over the 4k frame limit.
    raw = json.dumps({"type": "heartbeat", "pad": "€" * 1500}, ensure_ascii=False)
    assert len(raw) < FRAME_LIMIT < len(raw.encode())
    assert refused(raw).code == protocol.PAYLOAD_TOO_LARGE


def test_it_refuses_a_payload_over_the_payload_limit_and_echoes_the_ref():
    error = refused({"type": "send", "to": "bob", "payload": "x" * PAYLOAD_LIMIT, "ref": "big"})
    assert error.code == protocol.PAYLOAD_TOO_LARGE
    assert error.frame()["ref"] == "big"


def test_it_measures_the_payload_limit_in_bytes_not_characters():
    # 400 three-byte characters: 1.2k bytes of payload, over the 1k payload limit.
    raw = json.dumps({"type": "send", "to": "bob", "payload": "€" * 400}, ensure_ascii=False)
    assert len(raw) < PAYLOAD_LIMIT
    assert refused(raw).code == protocol.PAYLOAD_TOO_LARGE


def test_it_accepts_a_large_frame_whose_payload_fits():
    # The frame is over the payload limit only because of fields around the payload.
    frame = {"type": "send", "to": "bob", "payload": "x" * 900, "id": "i" * 128, "ref": "r" * 128}
    assert len(json.dumps(frame)) > PAYLOAD_LIMIT
    assert parse(frame)["payload"] == "x" * 900


def test_it_checks_frame_fields_before_payload_size():
    error = refused({"type": "send", "to": "Not Valid", "payload": "x" * PAYLOAD_LIMIT})
    assert error.code == protocol.INVALID_FRAME and error.extra["field"] == "to"


# --- Server frames -------------------------------------------------------------------------------


def test_it_builds_server_frames_with_utc_timestamps():
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert protocol.heartbeat_ack_frame(ref=None, server_time=at) == {
        "type": "heartbeat_ack",
        "server_time": "2025-01-02T03:04:05Z",
    }
    message = protocol.message_frame(
        message_id=MESSAGE_ID, seq=3, kind="topic", sender="alice", payload=1, sent_at=at, topic="t"
    )
    assert (
        message["topic"] == "t" and message["from"] == "alice" and message["redelivered"] is False
    )
    welcome = protocol.welcome_frame(
        agent_id="a",
        session_id=uuid.UUID(MESSAGE_ID),
        heartbeat_interval=30,
        pending=0,
        server_time=at,
    )
    assert welcome["session_id"] == MESSAGE_ID and welcome["server_time"] == "2025-01-02T03:04:05Z"


def test_a_message_frame_takes_its_id_and_time_as_texts_made_once_for_many_frames():
    at = datetime(2025, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)
    fields = {"seq": 3, "kind": "broadcast", "sender": "alice", "payload": {"n": 1}}
    made = protocol.message_frame(message_id=uuid.UUID(MESSAGE_ID), sent_at=at, **fields)
    given = protocol.message_frame(message_id=MESSAGE_ID, sent_at=protocol.isoformat(at), **fields)
    assert made == given and given["sent_at"] == "2025-01-02T03:04:05.006000Z"


def test_it_adds_extra_fields_to_error_frames():
    frame = protocol.error_frame(protocol.RATE_LIMITED, "slow down", ref="r", retry_after=2)
    assert frame == {
        "type": "error",
        "code": "rate_limited",
        "detail": "slow down",
        "ref": "r",
        "retry_after": 2,
    }
