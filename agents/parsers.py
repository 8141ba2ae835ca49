"""Request body parsing for the REST API."""

import orjson
from django.conf import settings
from rest_framework import exceptions, parsers


def nul_path(data) -> tuple | None:
    """Return where the first NUL character sits in parsed JSON (keys included), or None."""
    # Iterative: bodies may nest deeper than Python's recursion limit allows a walk to go.
    stack = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if "\x00" in key:
                    return (*path, key)
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in enumerate(value))
    return None


class JSONParser(parsers.JSONParser):
    """Parse JSON bodies with orjson, which bounds nesting and refuses lone surrogates.

    The standard library parser recurses until RecursionError (a 500) on deeply nested input and
    accepts lone surrogates and NUL characters, neither of which PostgreSQL can store.
    """

    def parse(self, stream, media_type=None, parser_context=None):
        raw = stream.read()
        encoding = (parser_context or {}).get("encoding") or settings.DEFAULT_CHARSET
        try:
            if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
                # bytes.decode accepts text encodings only, never bz2_codec and the like.
                raw = raw.decode(encoding)
            data = orjson.loads(raw)
        except (LookupError, UnicodeDecodeError, orjson.JSONDecodeError) as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        # A NUL can only arrive escaped; skip the walk for the bodies (nearly all) without one.
        if b"\\u0000" in (raw if isinstance(raw, bytes) else raw.encode()):
            path = nul_path(data)
            if path is not None:
                where = ".".join(str(part) for part in path) or "body"
                field = path[0] if path and isinstance(path[0], str) else "non_field_errors"
                raise exceptions.ValidationError(
                    {field: [f"Text cannot contain NUL (\\u0000) characters (at {where})."]}
                )
        return data
