import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from django.db import connection
from psycopg.adapt import AdaptersMap, PyFormat, Transformer
from psycopg.types.numeric import Int4, Int8

from messaging import pg_arrays
from messaging.pg_arrays import Bigints, Integers, Texts, Timestamps, Uuids

NOW = datetime.now(UTC)
CASES = [
    (Bigints([1, -5, 2**63 - 1, -(2**63)]), "bigint[]"),
    (Bigints([None, 3, None]), "bigint[]"),
    (Bigints([]), "bigint[]"),
    (Integers([0, 2**31 - 1, -(2**31)]), "integer[]"),
    (Texts(["a", "", "ünïcode ✓", None, "x" * 5000]), "text[]"),
    (Texts([]), "text[]"),
    (Uuids([uuid.uuid4(), uuid.uuid4()]), "uuid[]"),
    (Uuids([None, uuid.uuid4()]), "uuid[]"),
    (
        Timestamps(
            [NOW, NOW + timedelta(days=400), datetime(1990, 5, 1, 12, 0, 0, 1, tzinfo=UTC), None]
        ),
        "timestamptz[]",
    ),
]


def _psycopg_dump(values) -> bytes:
    return bytes(Transformer().dump_sequence([values], [PyFormat.BINARY])[0])


def _our_dump(array) -> bytes:
    adapters = AdaptersMap(psycopg.adapters)
    pg_arrays.register(type("Connection", (), {"adapters": adapters})())
    return bytes(Transformer(adapters).dump_sequence([array], [PyFormat.BINARY])[0])


@pytest.mark.parametrize(
    ("array", "typed"),
    [
        (Bigints([1, -5, None, 2**63 - 1]), [Int8(1), Int8(-5), None, Int8(2**63 - 1)]),
        (Integers([1, 7]), [Int4(1), Int4(7)]),
        (Texts(["a", "ünï", None]), ["a", "ünï", None]),
        (Uuids([uuid.uuid4(), None]), None),
        (Timestamps([NOW, None, datetime(1990, 5, 1, tzinfo=UTC)]), None),
    ],
    ids=["bigint", "integer", "text", "uuid", "timestamptz"],
)
def test_an_array_is_written_byte_for_byte_as_psycopg_writes_a_list_of_its_type(array, typed):
    assert _our_dump(array) == _psycopg_dump(array.values if typed is None else typed)


@pytest.mark.django_db
@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's binary arrays")
@pytest.mark.parametrize(("array", "sql_type"), CASES, ids=[repr(a)[:40] for a, _ in CASES])
def test_postgresql_reads_back_the_values_of_each_array(array, sql_type):
    connection.ensure_connection()
    with psycopg.Cursor(connection.connection) as cursor:  # binds on the server, as batch.py
        pg_arrays.register(cursor)  # a cursor has adapters of its own
        (read,) = cursor.execute(f"SELECT %b::{sql_type}", (array,)).fetchone()
    assert read == array.values


@pytest.mark.django_db
@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's binary timestamps")
@pytest.mark.parametrize(
    "moment",
    [NOW, datetime(1990, 5, 1, 12, 0, 0, 1, tzinfo=UTC), datetime(2000, 1, 1, tzinfo=UTC)],
    ids=["now", "before-2000", "epoch"],
)
def test_postgresql_reads_a_timestamp_as_the_moment_it_was(moment):
    connection.ensure_connection()
    result = connection.connection.pgconn.exec_params(
        b"SELECT $1::timestamptz = $2::timestamptz",
        [pg_arrays.timestamp(moment), moment.isoformat().encode()],
        param_formats=[1, 0],
    )
    assert result.get_value(0, 0) == b"t"


def test_no_moment_is_null():
    assert pg_arrays.timestamp(None) is None
