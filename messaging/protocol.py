"""The WebSocket wire protocol: frame parsing, validation and building, with no I/O.

Every client frame is checked here before any handler sees it, so a malformed frame becomes an
`error` frame naming the field and never an exception inside the consumer.
"""

import re
import uuid
from datetime import datetime
from typing import Any

import orjson

AGENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}\Z")
CAPABILITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}\Z")
MAX_REF = 128
MAX_CLIENT_ID = 128
MAX_ACK_IDS = 1000
MAX_TTL = 30 * 86400

# Error codes of the contract.
INVALID_JSON = "invalid_json"
INVALID_FRAME = "invalid_frame"
UNKNOWN_TYPE = "unknown_type"
UNKNOWN_RECIPIENT = "unknown_recipient"
FORBIDDEN = "forbidden"
PAYLOAD_TOO_LARGE = "payload_too_large"
RATE_LIMITED = "rate_limited"
NO_RESPONDERS = "no_responders"
TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"
NOT_AUTHENTICATED = "not_authenticated"

# Close codes of the contract.
CLOSE_NOT_AUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_AUTH_TIMEOUT = 4408
CLOSE_CONNECTION_LIMIT = 4409
CLOSE_RATE_LIMIT = 4429
CLOSE_TOO_BIG = 1009
CLOSE_RESTARTING = 1012


class ProtocolError(Exception):
    """A frame that cannot be done; becomes an `error` frame and leaves the socket open."""

    def __init__(self, code: str, detail: str, *, ref: str | None = None, **extra):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.ref = ref
        self.extra = extra

    def frame(self) -> dict:
        return error_frame(self.code, self.detail, ref=self.ref, **self.extra)


def _invalid(field: str, problem: str, ref) -> ProtocolError:
    return ProtocolError(INVALID_FRAME, f"{field}: {problem}", ref=ref, field=field)


# --- Field readers --------------------------------------------------------------------------


def _str(frame, field, ref, *, pattern=None, max_length=None, required=True):
    value = frame.get(field)
    if value is None:
        if required:
            raise _invalid(field, "is required", ref)
        return None
    if not isinstance(value, str):
        raise _invalid(field, "must be a string", ref)
    if max_length is not None and len(value) > max_length:
        raise _invalid(field, f"must be at most {max_length} characters", ref)
    if pattern is not None and not pattern.match(value):
        raise _invalid(field, f"must match {pattern.pattern.removesuffix(chr(92) + 'Z')}", ref)
    return value


def _number(frame, field, ref, *, minimum, maximum, integer=False):
    value = frame.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(field, "must be a number", ref)
    if integer and not isinstance(value, int):
        raise _invalid(field, "must be an integer", ref)
    if not minimum <= value <= maximum:
        raise _invalid(field, f"must be between {minimum} and {maximum}", ref)
    return value


def _payload(frame, ref):
    if "payload" not in frame:
        raise _invalid("payload", "is required", ref)
    return frame["payload"]


def _delivery_options(frame, ref) -> dict:
    return {
        "payload": _payload(frame, ref),
        "client_id": _str(frame, "id", ref, max_length=MAX_CLIENT_ID, required=False),
        "ttl": _number(frame, "ttl", ref, minimum=1, maximum=MAX_TTL),
    }


# --- Per-type validation: each returns the normalised fields the handler needs ---------------


def _auth(frame, ref):
    return {"token": _str(frame, "token", ref, max_length=8192)}


def _send(frame, ref):
    return {"to": _str(frame, "to", ref, pattern=AGENT_ID_RE), **_delivery_options(frame, ref)}


def _broadcast(frame, ref):
    return _delivery_options(frame, ref)


def _publish(frame, ref):
    return {"topic": _str(frame, "topic", ref, pattern=TOPIC_RE), **_delivery_options(frame, ref)}


def _topic_only(frame, ref):
    return {"topic": _str(frame, "topic", ref, pattern=TOPIC_RE)}


def _request(frame, ref):
    to = _str(frame, "to", ref, pattern=AGENT_ID_RE, required=False)
    capability = _str(frame, "capability", ref, pattern=CAPABILITY_RE, required=False)
    if (to is None) == (capability is None):
        raise _invalid("to", "send exactly one of 'to' and 'capability'", ref)
    return {
        "to": to,
        "capability": capability,
        "payload": _payload(frame, ref),
        "timeout": _number(frame, "timeout", ref, minimum=0.1, maximum=3600),
        "client_id": _str(frame, "id", ref, max_length=MAX_CLIENT_ID, required=False),
    }


def _reply(frame, ref):
    raw = _str(frame, "in_reply_to", ref, max_length=64)
    try:
        in_reply_to = uuid.UUID(raw)
    except ValueError:
        raise _invalid("in_reply_to", "must be a message_id", ref) from None
    return {"in_reply_to": in_reply_to, "payload": _payload(frame, ref)}


def _ack(frame, ref):
    ids = frame.get("message_ids")
    up_to_seq = frame.get("up_to_seq")
    if (ids is None) == (up_to_seq is None):
        raise _invalid("message_ids", "send exactly one of 'message_ids' and 'up_to_seq'", ref)
    if up_to_seq is not None:
        seq = _number(frame, "up_to_seq", ref, minimum=0, maximum=2**63 - 1, integer=True)
        return {"message_ids": None, "up_to_seq": seq}
    if not isinstance(ids, list) or len(ids) > MAX_ACK_IDS:
        raise _invalid("message_ids", f"must be a list of at most {MAX_ACK_IDS} ids", ref)
    parsed = []
    for value in ids:
        try:
            parsed.append(uuid.UUID(value))
        except (TypeError, ValueError, AttributeError):
            raise _invalid("message_ids", f"{value!r} is not a message_id", ref) from None
    return {"message_ids": parsed, "up_to_seq": None}


def _nothing(frame, ref):
    return {}


VALIDATORS = {
    "auth": _auth,
    "send": _send,
    "broadcast": _broadcast,
    "publish": _publish,
    "subscribe": _topic_only,
    "unsubscribe": _topic_only,
    "request": _request,
    "reply": _reply,
    "ack": _ack,
    "heartbeat": _nothing,
}


def register_frame_type(name: str, validator) -> None:
    """Let another app (the context store) add client frame types without editing this module."""
    VALIDATORS[name] = validator


def nul_path(value) -> tuple | None:
    """Return where the first NUL character sits in parsed JSON (keys included), or None."""
    # Iterative, so no nesting that orjson accepts can exhaust the stack.
    stack = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    return (*path, key)
                stack.append(((*path, key), child))
        elif isinstance(item, list):
            stack.extend(((*path, index), child) for index, child in enumerate(item))
    return None


def parse_frame(raw: str | bytes, *, max_frame_bytes: int, max_payload_bytes: int) -> dict:
    """Parse and validate one client frame; raise ProtocolError naming what is wrong."""
    # Limits are in bytes: a text frame of multi-byte characters is up to four times its length.
    # "surrogatepass" sizes a str holding lone surrogates instead of raising; orjson then refuses
    # it as invalid JSON.
    size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
    if size > max_frame_bytes:
        raise ProtocolError(PAYLOAD_TOO_LARGE, f"frame is larger than {max_frame_bytes} bytes")
    try:
        frame = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(INVALID_JSON, f"frame is not valid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise ProtocolError(INVALID_FRAME, "frame must be a JSON object", field="type")
    ref = frame.get("ref")
    if ref is not None and (not isinstance(ref, str) or len(ref) > MAX_REF):
        raise _invalid("ref", f"must be a string of at most {MAX_REF} characters", None)
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise _invalid("type", "is required and must be a string", ref)
    validator = VALIDATORS.get(kind)
    if validator is None:
        raise ProtocolError(UNKNOWN_TYPE, f"unknown frame type {kind[:40]!r}", ref=ref)
    # PostgreSQL cannot store NUL in text or JSON. In valid JSON a NUL can only arrive escaped,
    # so nearly every frame skips the walk.
    if (b"\\u0000" if isinstance(raw, bytes) else "\\u0000") in raw:
        path = nul_path(frame)
        if path is not None:
            field = str(path[0])
            where = ".".join(str(part) for part in path)
            problem = f"text cannot contain NUL (\\u0000) characters (at {where})"
            raise _invalid(field, problem, None if field == "ref" else ref)
    fields = validator(frame, ref)
    # A payload can only exceed the limit if the whole frame does.
    too_large = (
        "payload" in fields
        and size > max_payload_bytes
        and len(orjson.dumps(fields["payload"])) > max_payload_bytes
    )
    if too_large:
        raise ProtocolError(
            PAYLOAD_TOO_LARGE, f"payload is larger than {max_payload_bytes} bytes", ref=ref
        )
    fields["type"] = kind
    fields["ref"] = ref
    return fields


# --- Server frames ---------------------------------------------------------------------------


def isoformat(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def error_frame(code: str, detail: str, *, ref: str | None = None, **extra) -> dict:
    frame = {"type": "error", "code": code, "detail": detail}
    if ref is not None:
        frame["ref"] = ref
    frame.update(extra)
    return frame


def welcome_frame(*, agent_id, session_id, heartbeat_interval, pending, server_time) -> dict:
    return {
        "type": "welcome",
        "agent_id": agent_id,
        "session_id": str(session_id),
        "heartbeat_interval": heartbeat_interval,
        "pending": pending,
        "server_time": isoformat(server_time),
    }


def message_frame(
    *,
    message_id,
    seq: int,
    kind: str,
    sender: str,
    payload: Any,
    sent_at: datetime | str,
    topic: str = "",
    redelivered: bool = False,
    attempt: int = 1,
) -> dict:
    """A message frame; `message_id` may be given as its text and `sent_at` as its isoformat(),
    made once for many frames."""
    frame = {
        "type": "message",
        "message_id": str(message_id),
        "seq": seq,
        "kind": kind,
        "from": sender,
        "payload": payload,
        "sent_at": sent_at if type(sent_at) is str else isoformat(sent_at),
        "redelivered": redelivered,
        "attempt": attempt,
    }
    if topic:
        frame["topic"] = topic
    return frame


def accepted_frame(*, ref, message_id, status, recipients, duplicate) -> dict:
    return {
        "type": "accepted",
        "ref": ref,
        "message_id": str(message_id),
        "status": status,
        "recipients": recipients,
        "duplicate": duplicate,
    }


def response_frame(*, ref, in_reply_to, sender, payload) -> dict:
    return {
        "type": "response",
        "ref": ref,
        "in_reply_to": str(in_reply_to),
        "from": sender,
        "payload": payload,
    }


def topic_frame(kind: str, *, ref, topic) -> dict:
    return {"type": kind, "ref": ref, "topic": topic}


def heartbeat_ack_frame(*, ref, server_time: datetime) -> dict:
    frame = {"type": "heartbeat_ack", "server_time": isoformat(server_time)}
    if ref is not None:
        frame["ref"] = ref
    return frame
