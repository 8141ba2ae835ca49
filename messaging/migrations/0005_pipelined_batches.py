"""PostgreSQL: hub_write_batch learns two arguments, so that the writer can send a batch while the
one before it is still running (messaging/engine.py): `after_batch`, the number of the batch that
must have been written on this connection before this one may be, and `this_batch`, the number
this one records once written. A batch whose predecessor failed fails with SQLSTATE HB001 and
writes nothing; the writer stores it again after the predecessor's own fallback, in order."""

import importlib

from django.db import migrations

# Migration modules' names start with a digit: not importable with an import statement.
writer_functions = importlib.import_module("messaging.migrations.0004_writer_functions")

BEFORE_BATCH = """\
    IF after_batch IS NOT NULL AND current_setting('hub.written_batch', true)
            IS DISTINCT FROM after_batch::text THEN
        RAISE EXCEPTION USING ERRCODE = 'HB001',
            MESSAGE = 'the batch before this one on its connection was not written';
    END IF;
"""
# A setting made in a transaction that fails is undone with it.
AFTER_BATCH = """\
    IF this_batch IS NOT NULL THEN
        PERFORM set_config('hub.written_batch', this_batch::text, false);
    END IF;
END
$$
"""

WRITE_BATCH = (
    writer_functions.WRITE_BATCH.replace(
        "    touched_agents bigint[]\n)",
        "    touched_agents bigint[],\n    after_batch bigint,\n    this_batch bigint\n)",
    )
    .replace("BEGIN\n", "BEGIN\n" + BEFORE_BATCH, 1)
    .replace("END\n$$\n", AFTER_BATCH)
)
# Each replacement above must have found its place in 0004's text.
assert "this_batch bigint\n)" in WRITE_BATCH and WRITE_BATCH.count("hub.written_batch") == 2

ARGUMENTS = "timestamptz, timestamptz" + ", text[], bigint[]" + (
    ", uuid[], bigint[], text[], text[], text[], text[], integer[], timestamptz[]"
    ", bigint[], bigint[], uuid[], bigint[], bigint[], timestamptz[]"
    ", integer[], bigint[], bigint[], bigint[], bigint[], integer[], bigint[], uuid[]"
    ", bigint[], bigint[], bigint[], bigint[], bigint[], bigint[]"
)
DROP_OLD = f"DROP FUNCTION IF EXISTS hub_write_batch({ARGUMENTS})"
DROP_NEW = f"DROP FUNCTION IF EXISTS hub_write_batch({ARGUMENTS}, bigint, bigint)"


def _on_postgresql(*statements):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            for statement in statements:
                schema_editor.execute(statement)

    return run


class Migration(migrations.Migration):
    dependencies = [("messaging", "0004_writer_functions")]

    operations = [
        migrations.RunPython(
            _on_postgresql(DROP_OLD, WRITE_BATCH),
            _on_postgresql(DROP_NEW, writer_functions.WRITE_BATCH),
        )
    ]
