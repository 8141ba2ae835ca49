"""PostgreSQL: the group-commit writer's function (migration 0004) acks up to a seq only the
deliveries after the seq the engine knows to be settled already (`ack_after`,
`joined_ack_after`).

An ack up to a seq read all of the recipient's deliveries below it: through
`delivery_pending_idx`, whose entries for deliveries acked before stay until a vacuum (3,687
acks read 31.2 million entries, 8,454 each, in 15 seconds of bench direct), or, as the plan made
at the writer's first batch had it in other runs, through `delivery_seq_unique`, every delivery
the recipient ever had. Bounded below, each ack reads its window whatever the plan.
"""

import importlib

from django.db import migrations

first = importlib.import_module("messaging.migrations.0004_writer_functions")

OLD_SIGNATURE = (
    "timestamptz, timestamptz, text[], bigint[], uuid[], bigint[], text[], text[], text[],"
    " text[], integer[], timestamptz[], bigint[], bigint[], uuid[], bigint[], bigint[],"
    " timestamptz[], integer[], bigint[], bigint[], bigint[], bigint[], integer[], bigint[],"
    " uuid[], bigint[], bigint[], bigint[], bigint[], bigint[], bigint[]"
)

_KEYED_BEFORE = """        WHERE recipient_id = ack_recipients[i] AND seq <= ack_seqs[i] AND {pending};""".format(
    pending=first.PENDING
)
_KEYED_AFTER = (
    "        WHERE recipient_id = ack_recipients[i] AND seq > ack_after[i]"
    " AND seq <= ack_seqs[i]\n            AND {pending};"
).format(pending=first.PENDING)
_JOINED_BEFORE = """        FROM unnest(joined_ack_recipients, joined_ack_seqs) AS v (recipient, up_to)
        WHERE recipient_id = v.recipient AND seq <= v.up_to AND {pending};""".format(
    pending=first.PENDING
)
_JOINED_AFTER = """        FROM unnest(joined_ack_recipients, joined_ack_after, joined_ack_seqs)
            AS v (recipient, after, up_to)
        WHERE recipient_id = v.recipient AND seq > v.after AND seq <= v.up_to AND {pending};""".format(
    pending=first.PENDING
)


def _new_function() -> str:
    text = first.WRITE_BATCH
    for old, new in (
        ("    ack_recipients bigint[],\n", "    ack_recipients bigint[],\n    ack_after bigint[],\n"),
        (
            "    joined_ack_recipients bigint[],\n",
            "    joined_ack_recipients bigint[],\n    joined_ack_after bigint[],\n",
        ),
        (_KEYED_BEFORE, _KEYED_AFTER),
        (_JOINED_BEFORE, _JOINED_AFTER),
    ):
        if text.count(old) != 1:
            raise ValueError(f"migration 0004's function has changed: {old!r}")
        text = text.replace(old, new)
    return text


DROP_OLD = f"DROP FUNCTION hub_write_batch({OLD_SIGNATURE})"
DROP_NEW = "DROP FUNCTION hub_write_batch"


class Migration(migrations.Migration):
    dependencies = [
        ("messaging", "0005_delivery_message_key_unchecked"),
    ]

    # Backwards, in reverse order: the new function dropped, then 0004's created again.
    operations = [
        migrations.RunPython(
            first._on_postgresql(DROP_OLD), first._on_postgresql(first.WRITE_BATCH)
        ),
        migrations.RunPython(first._on_postgresql(_new_function()), first._on_postgresql(DROP_NEW)),
    ]
