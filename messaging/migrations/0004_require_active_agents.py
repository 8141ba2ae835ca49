"""PostgreSQL: a function the group-commit writer calls to check, inside a batch's transaction,
that the recipients it remembers from earlier batches are still active agents."""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION hub_require_active_agents(names text[], ids bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(ids, 1), 0) LOOP
        -- A primary-key lookup per agent, whatever the table held when this was planned.
        PERFORM FROM agents_agent WHERE id = ids[i] AND agent_id = names[i] AND state = 'active';
        IF NOT FOUND THEN
            RAISE foreign_key_violation USING
                MESSAGE = 'agent ' || names[i] || ' is no longer an active agent';
        END IF;
    END LOOP;
END
$$
"""
DROP = "DROP FUNCTION IF EXISTS hub_require_active_agents(text[], bigint[])"


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

    operations = [migrations.RunPython(_on_postgresql(CREATE), _on_postgresql(DROP))]
