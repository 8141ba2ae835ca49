"""Register benchmark agents in bulk through agents.services and write their access tokens.

    python -m bench.provision --spec agents.json --out tokens.json

Run it with the hub's environment (DATABASE_URL or SQLITE_PATH): it writes to that database. The
spec is a JSON list of {"agent_id", "capabilities": [names]}; the output is the same list with an
"access" token added to each. Registering ten thousand agents one REST call at a time would take
minutes and measure nothing the REST workload does not; this calls the same services the
registration view calls, in batched transactions.
"""

import argparse
import os
from pathlib import Path

import orjson

BATCH = 500


def provision(specs: list[dict]) -> list[dict]:
    from django.db import transaction

    from agents import services

    out = []
    for start in range(0, len(specs), BATCH):
        with transaction.atomic():
            for spec in specs[start : start + BATCH]:
                agent, _secret = services.agent_register(
                    agent_id=spec["agent_id"],
                    name=spec.get("name", ""),
                    capabilities=[{"name": name} for name in spec.get("capabilities", ())],
                )
                tokens = services.tokens_issue(agent=agent)
                out.append({**spec, "access": tokens["access"]})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.provision")
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcp_project.settings")
    import django

    django.setup()
    agents = provision(orjson.loads(args.spec.read_bytes()))
    settle_statistics()
    args.out.write_bytes(orjson.dumps(agents))


def settle_statistics() -> None:
    """Give PostgreSQL's planner statistics of the registry tables just filled, as autovacuum
    would within a minute of the bulk insert. Measured straight after provisioning, the planner
    still believed them empty: nine active agents of 10,000, a sequential scan of the
    capabilities for one page of discovery (8 ms of database time a request instead of under
    one). The message tables are left alone: statistics of them taken empty, before the run
    fills them, made the latency workload's batches wait (p99 13-21 -> 174-234 ms)."""
    from django.db import connection

    from agents.models import Agent, Capability, IssuedToken

    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            for model in (Agent, Capability, IssuedToken):
                cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")


if __name__ == "__main__":
    main()
