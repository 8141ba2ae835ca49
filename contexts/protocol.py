"""The context store's part of the wire protocol: names, watch frames and matching, with no I/O.

The agent socket dispatches `watch` and `unwatch` frames validated here (registered with
`messaging.protocol.register_frame_type` when the app loads), so a malformed watch becomes an
`error` frame naming the field and never an exception inside the consumer.
"""

import re
from dataclasses import dataclass, field

from messaging.protocol import AGENT_ID_RE, INVALID_FRAME, ProtocolError

CONTEXT_TYPES = ("task_result", "state_update", "error", "metadata")
# Tags and keys end up in URLs and admin filters; a small alphabet keeps them unambiguous there.
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:=/-]{0,63}\Z")
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}\Z")
MAX_TAGS = 20
WATCH_ID_MAX = 32

# Error code for a socket that already holds the configured number of watches.
TOO_MANY_WATCHES = "too_many_watches"

EVENTS = ("created", "updated", "deleted", "expired")
ROUTE_ALL = "all"


def pattern_text(pattern: re.Pattern) -> str:
    return pattern.pattern.removesuffix("\\Z")


def context_group(route: str) -> str:
    """Name the channel-layer group of one route: every change, or the changes of one type.

    Routes are "all" or a member of CONTEXT_TYPES, never raw client input, so the name is
    always valid for channels-redis (PITFALLS P5).
    """
    if route == ROUTE_ALL:
        return "ctx.all"
    if route not in CONTEXT_TYPES:
        raise ValueError(f"not a context route: {route!r}")
    return f"ctx.type.{route}"


# --- Client frames ---------------------------------------------------------------------------


def _invalid(name: str, problem: str, ref) -> ProtocolError:
    return ProtocolError(INVALID_FRAME, f"{name}: {problem}", ref=ref, field=name)


def _optional(frame: dict, name: str, ref, *, pattern: re.Pattern | None = None, choices=None):
    value = frame.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(name, "must be a string", ref)
    if choices is not None and value not in choices:
        raise _invalid(name, f"must be one of {', '.join(choices)}", ref)
    if pattern is not None and not pattern.match(value):
        raise _invalid(name, f"must match {pattern_text(pattern)}", ref)
    return value


def validate_watch(frame: dict, ref) -> dict:
    """Validate `{"type": "watch", "context_type"?, "agent_id"?, "tag"?, "key"?}`."""
    filters = {
        "context_type": _optional(frame, "context_type", ref, choices=CONTEXT_TYPES),
        "agent_id": _optional(frame, "agent_id", ref, pattern=AGENT_ID_RE),
        "tag": _optional(frame, "tag", ref, pattern=TAG_RE),
        "key": _optional(frame, "key", ref, pattern=KEY_RE),
    }
    return {"filters": {name: value for name, value in filters.items() if value is not None}}


def validate_unwatch(frame: dict, ref) -> dict:
    """Validate `{"type": "unwatch", "watch_id"}`."""
    watch_id = frame.get("watch_id")
    if watch_id is None:
        raise _invalid("watch_id", "is required", ref)
    if not isinstance(watch_id, str) or not 0 < len(watch_id) <= WATCH_ID_MAX:
        raise _invalid("watch_id", f"must be a string of 1 to {WATCH_ID_MAX} characters", ref)
    return {"watch_id": watch_id}


FRAME_VALIDATORS = {"watch": validate_watch, "unwatch": validate_unwatch}


# --- Watches ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Watch:
    """One socket's interest in context changes, matched locally against each event."""

    watch_id: str
    filters: dict
    # Context types this agent may read, decided when the watch was made.
    readable: frozenset = field(default_factory=lambda: frozenset(CONTEXT_TYPES))

    @property
    def route(self) -> str:
        return self.filters.get("context_type") or ROUTE_ALL

    def matches(self, entry: dict) -> bool:
        """Tell whether an entry (as REST shows it) passes every filter of this watch."""
        if entry["context_type"] not in self.readable:
            return False
        f = self.filters
        if "context_type" in f and entry["context_type"] != f["context_type"]:
            return False
        if "agent_id" in f and entry["agent_id"] != f["agent_id"]:
            return False
        if "key" in f and entry["key"] != f["key"]:
            return False
        return not ("tag" in f and f["tag"] not in entry["tags"])


# --- Server frames ---------------------------------------------------------------------------


def watching_frame(*, ref, watch_id: str, filters: dict) -> dict:
    return {"type": "watching", "ref": ref, "watch_id": watch_id, "filters": filters}


def unwatched_frame(*, ref, watch_id: str) -> dict:
    return {"type": "unwatched", "ref": ref, "watch_id": watch_id}


def context_frame(*, event: str, watch_id: str, entry: dict, version: int) -> dict:
    return {
        "type": "context",
        "event": event,
        "watch_id": watch_id,
        "entry": entry,
        "version": version,
    }
