"""Hardening of the daphne server process: oversized frames and its access log.

- A frame over daphne's --websocket-max-message-size is refused by autobahn before anything parses
  it, but autobahn's default is to drop the TCP connection, which a client sees as 1006 (abnormal
  closure) and cannot tell from a network fault. Failing with a close handshake sends the 1009
  (message too big) the protocol promises.
- The hub never accepts a token in a query string (only the Authorization header or the first
  WebSocket frame), but a client may still put one there by mistake, and daphne writes every
  request's full path, query string included, to its access log. Values of parameters that look
  like credentials, and anything shaped like a JWT, are replaced before the line is written.
"""

import re
import sys
from urllib.parse import parse_qsl, urlencode

REDACTED = "[redacted]"
# Parameter names, compared case-insensitively, whose values are never logged.
SENSITIVE = re.compile(r"(token|secret|password|passwd|key|auth|jwt|session|access|refresh)", re.I)
# A JWT anywhere in the query (three base64url parts, the header starting '{"'), whatever its name.
JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_installed = False


def redact_path(path: str) -> str:
    """Return the path with the values of credential-like query parameters replaced."""
    base, separator, query = path.partition("?")
    if not separator:
        return path
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(SENSITIVE.search(name) or JWT.search(name + value) for name, value in pairs):
        return path
    redacted = [
        (
            JWT.sub(REDACTED, name),
            REDACTED if SENSITIVE.search(name) or JWT.search(value) else value,
        )
        for name, value in pairs
    ]
    return f"{base}?{urlencode(redacted, safe='[]')}"


def install() -> None:
    """Under daphne, close oversized frames with 1009 and redact the access log; else nothing."""
    global _installed
    if _installed or "daphne.server" not in sys.modules:
        return
    _installed = True
    _close_instead_of_dropping()
    _redact_access_log()


def _close_instead_of_dropping() -> None:
    from daphne.ws_protocol import WebSocketFactory

    original = WebSocketFactory.__init__

    def init(factory, *args, **kwargs):
        original(factory, *args, **kwargs)
        # Each connection copies the factory's options when it opens; daphne sets its own
        # (sizes, timeouts) after this and leaves failByDrop alone.
        factory.setProtocolOptions(failByDrop=False)

    WebSocketFactory.__init__ = init


def _redact_access_log() -> None:
    from daphne.access import AccessLogGenerator

    log_action = AccessLogGenerator.__call__

    def redacting(generator, protocol, action, details):
        if isinstance(details.get("path"), str):
            details = {**details, "path": redact_path(details["path"])}
        return log_action(generator, protocol, action, details)

    AccessLogGenerator.__call__ = redacting
