"""Arrays of one element type, written in PostgreSQL's binary array format by a dumper of ours.

psycopg dumps a Python list by looking at its elements: it scans the list for a sample element,
finds the sample's dumper, builds an array dumper for that element type (a new one for every
cursor) and then dumps element by element through it. For the group-commit writer's statements,
whose columns each hold one known type, that was nearly half of the writer's own time in a small
batch: `PostgresQuery.convert` took 45% of `write_batch`'s CPU for a batch of one send (cProfile
with a CPU clock), for 25 arrays in 8 statements. Wrapping a column in the class of its type
says the element type up front; the dumper writes the header and the elements in one pass.

Register the dumpers on a connection with `register(connection)`. The statements still cast
each parameter to its column's array type (`%b::bigint[]`); values that do not fit their wrapper
(text in `Bigints`, a number in `Texts`) fail in the dumper.
"""

import struct
from datetime import UTC, datetime, timedelta

from psycopg.adapt import Dumper
from psycopg.pq import Format

# ndim, has-null flag, element type; then, for one dimension, its length and lower bound.
_HEAD = struct.Struct("!iii")
_HEAD_1D = struct.Struct("!iiiii")
_LENGTH = struct.Struct("!i")
_NULL = b"\xff\xff\xff\xff"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Array:
    """The values of one array parameter (None for NULL elements)."""

    __slots__ = ("values",)

    def __init__(self, values):
        self.values = values

    def __repr__(self):
        return f"{type(self).__name__}({self.values!r})"


class Bigints(Array):
    pass


class Integers(Array):
    pass


class Texts(Array):
    pass


class Uuids(Array):
    pass


class Timestamps(Array):
    """Aware datetimes, for timestamptz[]."""


class _ArrayDumper(Dumper):
    """One-dimensional arrays of variable-size elements: each is its length and its bytes."""

    format = Format.BINARY
    element_oid: int

    def dump(self, obj: Array) -> bytes:
        values = obj.values
        if not values:
            return _HEAD.pack(0, 0, self.element_oid)
        parts = [_HEAD_1D.pack(1, None in values, self.element_oid, len(values), 1)]
        for value in values:
            if value is None:
                parts.append(_NULL)
            else:
                data = self.encode(value)
                parts.append(_LENGTH.pack(len(data)))
                parts.append(data)
        return b"".join(parts)

    def encode(self, value) -> bytes:
        raise NotImplementedError


class _FixedSizeDumper(_ArrayDumper):
    """Elements of one size, packed by one struct call when none is NULL."""

    code: str  # struct code of one element
    size: int

    def dump(self, obj: Array) -> bytes:
        values = obj.values
        if not values or None in values:
            return super().dump(obj)
        interleaved = [self.size] * (2 * len(values))  # each element's length, then its value
        interleaved[1::2] = self.encode_all(values)
        head = _HEAD_1D.pack(1, 0, self.element_oid, len(values), 1)
        return head + struct.pack("!" + ("i" + self.code) * len(values), *interleaved)

    def encode_all(self, values) -> list:
        return values

    def encode(self, value) -> bytes:
        return struct.pack("!" + self.code, *self.encode_all([value]))


class _BigintsDumper(_FixedSizeDumper):
    oid, element_oid, code, size = 1016, 20, "q", 8


class _IntegersDumper(_FixedSizeDumper):
    oid, element_oid, code, size = 1007, 23, "i", 4


class _TimestampsDumper(_FixedSizeDumper):
    oid, element_oid, code, size = 1185, 1184, "q", 8

    def encode_all(self, values) -> list:
        return [(value - _PG_EPOCH) // _MICROSECOND for value in values]


class _UuidsDumper(_FixedSizeDumper):
    oid, element_oid, code, size = 2951, 2950, "16s", 16

    def encode_all(self, values) -> list:
        return [value.bytes for value in values]


class _TextsDumper(_ArrayDumper):
    oid, element_oid = 1009, 25

    def encode(self, value) -> bytes:
        return value.encode()


DUMPERS = {
    Bigints: _BigintsDumper,
    Integers: _IntegersDumper,
    Texts: _TextsDumper,
    Uuids: _UuidsDumper,
    Timestamps: _TimestampsDumper,
}


def register(context) -> None:
    """Let a psycopg connection or cursor dump the array classes of this module."""
    for cls, dumper in DUMPERS.items():
        context.adapters.register_dumper(cls, dumper)
