"""Arrays of one element type, written in PostgreSQL's binary array format by code of ours.

psycopg dumps a Python list by looking at its elements: it scans the list for a sample element,
finds the sample's dumper, builds an array dumper for that element type (a new one for every
cursor) and then dumps element by element through it. For the group-commit writer's statements,
whose columns each hold one known type, that was nearly half of the writer's own time in a small
batch: `PostgresQuery.convert` took 45% of `write_batch`'s CPU for a batch of one send (cProfile
with a CPU clock), for 25 arrays in 8 statements. Wrapping a column in the class of its type
says the element type up front; `binary` writes the header and the elements in one pass.

The wrappers go to psycopg as parameters once their dumpers are registered on a connection
(`register(connection)`); the writer's batch call, which bypasses psycopg's parameter
conversion, takes `binary(values)` of each column as it is. The statements still cast each
parameter to its column's array type (`%b::bigint[]`); values that do not fit their wrapper
(text in `Bigints`, a number in `Texts`) fail here.
"""

import struct
from datetime import UTC, datetime, timedelta

from psycopg.adapt import Dumper
from psycopg.pq import Format

# ndim, has-null flag, element type; then, for one dimension, its length and lower bound.
_HEAD = struct.Struct("!iii")
_HEAD_1D = struct.Struct("!iiiii")
_LENGTH = struct.Struct("!i")
_TIMESTAMP = struct.Struct("!q")
_NULL = b"\xff\xff\xff\xff"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Array:
    """The values of one array parameter (None for NULL elements). One dimension, elements of
    variable size: each is its length and its bytes."""

    __slots__ = ("values",)
    oid: int  # of the array type
    element_oid: int

    def __init__(self, values):
        self.values = values

    def __repr__(self):
        return f"{type(self).__name__}({self.values!r})"

    @classmethod
    def binary(cls, values) -> bytes:
        """`values` in PostgreSQL's binary format of this array type."""
        if not values:
            return _HEAD.pack(0, 0, cls.element_oid)
        parts = [_HEAD_1D.pack(1, None in values, cls.element_oid, len(values), 1)]
        for value in values:
            if value is None:
                parts.append(_NULL)
            else:
                data = cls.encode(value)
                parts.append(_LENGTH.pack(len(data)))
                parts.append(data)
        return b"".join(parts)

    @classmethod
    def encode(cls, value) -> bytes:
        raise NotImplementedError


class _FixedSize(Array):
    """Elements of one size, packed by one struct call when none is NULL."""

    __slots__ = ()
    code: str  # struct code of one element
    size: int

    @classmethod
    def binary(cls, values) -> bytes:
        if not values or None in values:
            return super().binary(values)
        interleaved = [cls.size] * (2 * len(values))  # each element's length, then its value
        interleaved[1::2] = cls.encode_all(values)
        head = _HEAD_1D.pack(1, 0, cls.element_oid, len(values), 1)
        return head + struct.pack("!" + ("i" + cls.code) * len(values), *interleaved)

    @classmethod
    def encode_all(cls, values) -> list:
        return values

    @classmethod
    def encode(cls, value) -> bytes:
        return struct.pack("!" + cls.code, *cls.encode_all([value]))


class Bigints(_FixedSize):
    __slots__ = ()
    oid, element_oid, code, size = 1016, 20, "q", 8


class Integers(_FixedSize):
    __slots__ = ()
    oid, element_oid, code, size = 1007, 23, "i", 4


class Timestamps(_FixedSize):
    """Aware datetimes, for timestamptz[]."""

    __slots__ = ()
    oid, element_oid, code, size = 1185, 1184, "q", 8

    @classmethod
    def encode_all(cls, values) -> list:
        return [_microseconds(value) for value in values]


class Uuids(_FixedSize):
    __slots__ = ()
    oid, element_oid, code, size = 2951, 2950, "16s", 16

    @classmethod
    def encode_all(cls, values) -> list:
        return [value.bytes for value in values]


class Texts(Array):
    __slots__ = ()
    oid, element_oid = 1009, 25

    @classmethod
    def encode(cls, value) -> bytes:
        return value.encode()


def timestamp(value: datetime | None) -> bytes | None:
    """An aware datetime in PostgreSQL's binary format of timestamptz (None: NULL)."""
    return None if value is None else _TIMESTAMP.pack(_microseconds(value))


def _microseconds(value: datetime) -> int:
    """An aware datetime as PostgreSQL stores a timestamptz: microseconds since 2000."""
    return (value - _PG_EPOCH) // _MICROSECOND


class _ArrayDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: Array) -> bytes:
        return obj.binary(obj.values)


DUMPERS = {
    cls: type(f"{cls.__name__}Dumper", (_ArrayDumper,), {"oid": cls.oid})
    for cls in (Bigints, Integers, Texts, Uuids, Timestamps)
}


def register(context) -> None:
    """Let a psycopg connection or cursor dump the array classes of this module."""
    for cls, dumper in DUMPERS.items():
        context.adapters.register_dumper(cls, dumper)
