"""PostgreSQL: the group-commit writer's batch as one function call (messaging/batch.py,
`_PostgresStatements`). The tables, columns and statuses are those of the models at this
migration; a migration that changes them replaces the function."""

from django.db import migrations

# What a batch writes, in this order: the check of remembered recipients; the messages; each
# recipient's mailbox moved on by its count (rows locked in recipient order, as every writer
# does, so none waits on another in a cycle) and the deliveries, each seq counted back from its
# recipient's new last seq; the acks, up to a seq or by message id, whose senders wait for the
# count, then those nobody waits for; the delivered marks; the liveness touches.
#
# Returned rows: ('s', recipient, new last seq) per mailbox; ('c', recipient, NULL, channel
# name) per open socket of a recipient, read after the mailbox locks, so a socket that opens
# later reads this batch's messages with its backlog; ('a', ack index, deliveries settled) per
# ack that wants its count.
#
# Few acks or marks go a statement each, keyed on the recipient (a plan made on a new hub's
# nearly empty tables joined the arrays with every entry of delivery_pending_idx); many go in
# the joined_ arrays, one statement whose cost the batch shares (messaging/batch.py decides).
# An ack also records the delivery its client saw, where no delivered mark did yet: the ack's
# time as the delivery's, one attempt.
ACKED = (
    "status = 'acked', acked_at = moment, delivered_at = coalesce(delivered_at, moment),"
    " attempts = CASE WHEN attempts = 0 THEN 1 ELSE attempts END"
)
DELIVERED = "status = 'delivered', delivered_at = moment, attempts = attempts + 1"
PENDING = "status IN ('queued', 'delivered')"

WRITE_BATCH = """
CREATE OR REPLACE FUNCTION hub_write_batch(
    moment timestamptz,
    created timestamptz,
    check_names text[],
    check_ids bigint[],
    message_ids uuid[],
    senders bigint[],
    kinds text[],
    topics text[],
    payloads text[],
    client_ids text[],
    recipient_counts integer[],
    message_expiries timestamptz[],
    boxes bigint[],
    box_counts bigint[],
    delivered_messages uuid[],
    recipients bigint[],
    backs bigint[],
    delivery_expiries timestamptz[],
    ack_indexes integer[],
    ack_recipients bigint[],
    ack_seqs bigint[],
    joined_ack_recipients bigint[],
    joined_ack_seqs bigint[],
    id_ack_indexes integer[],
    id_ack_recipients bigint[],
    id_ack_messages uuid[],
    mark_recipients bigint[],
    mark_seqs bigint[],
    joined_mark_recipients bigint[],
    joined_mark_seqs bigint[],
    touched_connections bigint[],
    touched_agents bigint[]
)
RETURNS TABLE (tag "char", key bigint, number bigint, channel text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    settled bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(check_ids, 1), 0) LOOP
        -- A primary-key lookup per agent, whatever the table held when this was planned.
        PERFORM FROM agents_agent
        WHERE id = check_ids[i] AND agent_id = check_names[i] AND state = 'active';
        IF NOT FOUND THEN
            RAISE foreign_key_violation USING
                MESSAGE = 'agent ' || check_names[i] || ' is no longer an active agent';
        END IF;
    END LOOP;
    IF cardinality(message_ids) > 0 THEN
        INSERT INTO messaging_message (id, sender_id, kind, topic, payload, client_id,
            recipient_count, created_at, expires_at)
        SELECT v.id, v.sender, v.kind, v.topic, v.payload::jsonb, v.client_id, v.n, created,
            v.expires
        FROM unnest(message_ids, senders, kinds, topics, payloads, client_ids,
            recipient_counts, message_expiries)
            AS v (id, sender, kind, topic, payload, client_id, n, expires);
    END IF;
    IF cardinality(boxes) > 0 THEN
        RETURN QUERY
        WITH bumped AS (
            INSERT INTO messaging_mailbox AS m (agent_id, last_seq)
            SELECT v.agent, v.n FROM unnest(boxes, box_counts) AS v (agent, n)
            ORDER BY v.agent
            ON CONFLICT (agent_id) DO UPDATE SET last_seq = m.last_seq + EXCLUDED.last_seq
            RETURNING m.agent_id, m.last_seq
        ), stored AS (
            INSERT INTO messaging_delivery (message_id, recipient_id, seq, status, attempts,
                expires_at)
            SELECT d.message, d.recipient, b.last_seq - d.back, 'queued', 0, d.expires
            FROM unnest(delivered_messages, recipients, backs, delivery_expiries)
                AS d (message, recipient, back, expires)
            JOIN bumped AS b ON b.agent_id = d.recipient
        )
        SELECT 's'::"char", b.agent_id, b.last_seq, NULL::text FROM bumped AS b;
        RETURN QUERY
        SELECT 'c'::"char", c.agent_id, NULL::bigint, c.channel_name::text
        FROM agents_connection AS c
        WHERE c.closed_at IS NULL AND c.agent_id = ANY(boxes);
    END IF;
    FOR i IN 1 .. coalesce(array_length(ack_recipients, 1), 0) LOOP
        UPDATE messaging_delivery SET {acked}
        WHERE recipient_id = ack_recipients[i] AND seq <= ack_seqs[i] AND {pending};
        IF ack_indexes[i] >= 0 THEN
            GET DIAGNOSTICS settled = ROW_COUNT;
            RETURN QUERY SELECT 'a'::"char", ack_indexes[i]::bigint, settled, NULL::text;
        END IF;
    END LOOP;
    IF cardinality(joined_ack_recipients) > 0 THEN
        UPDATE messaging_delivery SET {acked}
        FROM unnest(joined_ack_recipients, joined_ack_seqs) AS v (recipient, up_to)
        WHERE recipient_id = v.recipient AND seq <= v.up_to AND {pending};
    END IF;
    FOR i IN 1 .. coalesce(array_length(id_ack_recipients, 1), 0) LOOP
        UPDATE messaging_delivery SET {acked}
        WHERE message_id = id_ack_messages[i] AND recipient_id = id_ack_recipients[i]
            AND {pending};
        GET DIAGNOSTICS settled = ROW_COUNT;
        RETURN QUERY SELECT 'a'::"char", id_ack_indexes[i]::bigint, settled, NULL::text;
    END LOOP;
    FOR i IN 1 .. coalesce(array_length(mark_recipients, 1), 0) LOOP
        UPDATE messaging_delivery SET {delivered}
        WHERE recipient_id = mark_recipients[i] AND seq = mark_seqs[i] AND {pending};
    END LOOP;
    IF cardinality(joined_mark_recipients) > 0 THEN
        UPDATE messaging_delivery SET {delivered}
        FROM unnest(joined_mark_recipients, joined_mark_seqs) AS v (recipient, seq)
        WHERE recipient_id = v.recipient AND messaging_delivery.seq = v.seq AND {pending};
    END IF;
    IF cardinality(touched_connections) > 0 THEN
        UPDATE agents_connection SET last_seen_at = moment WHERE id = ANY(touched_connections);
        UPDATE agents_agent SET last_seen_at = moment WHERE id = ANY(touched_agents);
    END IF;
END
$$
""".format(acked=ACKED, delivered=DELIVERED, pending=PENDING)

DROP = "DROP FUNCTION IF EXISTS hub_write_batch"


def _on_postgresql(statement):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(statement)

    return run


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0001_initial"),
        ("messaging", "0003_message_ids_in_time_order"),
    ]

    operations = [migrations.RunPython(_on_postgresql(WRITE_BATCH), _on_postgresql(DROP))]
