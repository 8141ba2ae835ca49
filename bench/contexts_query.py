"""Benchmark GET contexts/ queries over a large context store; print the figures as JSON.

    python bench/contexts_query.py                      # 1,000,000 entries on its own SQLite file
    python bench/contexts_query.py --entries 100000 --repeat 100
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_contexts python bench/contexts_query.py

It loads N entries (bulk_create in batches) spread over A agents, four context types, a
vocabulary of tags (a few common, most rare) and keys, with 10% already expired, then times
each typical query through contexts.services.contexts_query plus the JSON representation of
the page, the work GET contexts/ does after authentication. A first page counts its matches
(up to CONTEXT_COUNT_CAP); a "next" page carries the count in its cursor. `--reuse` keeps a
loaded database between runs.

Figures (2026-11-21): 1,000,000 entries, 1,433,654 tag rows, 1,000 agents; SQLite 3.40.1 (a
1.4 GB file, no ANALYZE) and PostgreSQL 15 (after the VACUUM ANALYZE autovacuum would run), on 2
vCPUs shared with other test suites. Milliseconds p50 / p99, representation included, limit 100
unless named; SQLite over 50 runs at load average 3.7, PostgreSQL over 200 at 4-7:

    query                  SQLite           PostgreSQL
    recent                  6.6 /   8.1      14.4 /  30.4
    recent_next_page        4.3 /   8.4       7.2 /  20.1
    recent_limit_1000      37.4 / 126.2     114.8 / 327.7
    since_last_hour         4.8 /   6.0      22.3 /  40.7
    by_agent                9.3 /  68.1      22.9 /  45.6
    by_agent_and_type       8.1 /  10.9      22.2 /  50.1
    by_type                 7.4 /  11.9      23.0 /  38.4
    by_tag_rare             2.2 /   3.8       6.9 /  22.6
    by_tag_common           9.1 /  10.3      22.8 /  48.7
    by_tag_and_type         9.1 /  21.4      19.3 /  35.1
    by_key_all_owners       5.8 /  67.5      14.4 /  36.3
    by_agent_and_key        1.6 /   7.3       7.0 /  15.0
    deep_cursor_page        4.3 /   9.2      12.9 /  24.6
    create                  2.3 /  11.8       8.4 /  27.6
    update                  3.5 /  11.8      19.1 /  40.6

Every query reads one index in result order (EXPLAIN shows no sort and no scan of the table),
and the capped count of a first page reads that index alone (an index-only scan). Most of a
page's time is Python turning rows into models and JSON: the SQL of "recent_next_page" alone
takes 0.3 ms. At load average 7-10 the same SQLite queries took two to four times as long.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DB = Path(os.environ.get("TMPDIR", "/tmp")) / "hub-bench-contexts.sqlite3"
TYPES = ["task_result", "state_update", "metadata", "error"]
TYPE_WEIGHTS = [40, 30, 20, 10]
SPAN = timedelta(days=30)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="entries to load")
    parser.add_argument("--agents", type=int, default=1000, help="owners to spread them over")
    parser.add_argument("--repeat", type=int, default=50, help="timed runs of each query")
    parser.add_argument("--batch", type=int, default=10_000, help="rows per bulk_create")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help="SQLite file (no DATABASE_URL)")
    parser.add_argument("--reuse", action="store_true", help="keep an already loaded database")
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="run ANALYZE after loading (SQLite; PostgreSQL always)",
    )
    parser.add_argument("--seed", type=int, default=7)
    return parser.parse_args()


def setup_django(args) -> None:
    sys.path.insert(0, str(ROOT))
    if not os.environ.get("DATABASE_URL"):
        os.environ["SQLITE_PATH"] = str(args.db)
        if not args.reuse and args.db.exists():
            for suffix in ("", "-wal", "-shm"):
                Path(f"{args.db}{suffix}").unlink(missing_ok=True)
    # Changes are announced to nobody here; the in-memory layer keeps Redis out of the figures.
    os.environ.setdefault("HUB_CHANNEL_LAYER", "memory")
    os.environ.setdefault("HUB_LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcp_project.settings")
    import django

    django.setup()


def load(args, rng: random.Random) -> dict:
    """Fill the store; return how long it took and what was made."""
    from django.core.management import call_command
    from django.db import transaction
    from django.utils import timezone

    from agents.models import Agent
    from contexts.models import ContextEntry, ContextTag

    call_command("migrate", verbosity=0)
    existing = ContextEntry.objects.count()
    if args.reuse and existing >= args.entries:
        return {"loaded": False, "entries": existing}
    if existing:
        raise SystemExit("the database already holds entries; use --reuse or a fresh --db")

    started = time.perf_counter()
    Agent.objects.bulk_create(
        [Agent(agent_id=f"agent-{n:05d}", secret_digest="0" * 64) for n in range(args.agents)],
        ignore_conflicts=True,
    )
    owners = list(Agent.objects.order_by("pk").values_list("pk", flat=True))[: args.agents]
    now = timezone.now()
    step = SPAN / args.entries
    rare_tags = [f"job-{n}" for n in range(max(args.entries // 20, 10))]
    tag_rows = 0
    for start in range(0, args.entries, args.batch):
        entries, tags = [], []
        for i in range(start, min(start + args.batch, args.entries)):
            owner = owners[i % len(owners)]
            written = now - SPAN + step * i
            expired = rng.random() < 0.10
            chosen = ["env:prod" if rng.random() < 0.5 else "env:dev"]
            chosen += rng.sample(rare_tags, rng.choice((0, 0, 1)))
            if rng.random() < 0.1:
                chosen.append("urgent")
            # One entry in ten is named state, unique per owner: key i // agents is the n-th key.
            key = f"state-{i // len(owners)}" if i % 10 == 0 else None
            entry = ContextEntry(
                id=uuid.UUID(int=rng.getrandbits(128), version=4),
                owner_id=owner,
                context_type=rng.choices(TYPES, TYPE_WEIGHTS)[0],
                key=key,
                payload={"i": i, "status": "done", "rows": rng.randrange(1000)},
                tags=chosen,
                version=1,
                ttl_seconds=3600,
                created_at=written,
                updated_at=written,
                expires_at=(written - SPAN) if expired else (now + SPAN),
            )
            entries.append(entry)
            tags += [
                ContextTag(
                    entry=entry,
                    tag=tag,
                    context_type=entry.context_type,
                    updated_at=written,
                    expires_at=entry.expires_at,
                )
                for tag in chosen
            ]
        with transaction.atomic():
            ContextEntry.objects.bulk_create(entries)
            ContextTag.objects.bulk_create(tags)
        tag_rows += len(tags)
        done = min(start + args.batch, args.entries)
        if done % (args.batch * 20) == 0 or done == args.entries:
            print(f"loaded {done:,} entries", file=sys.stderr, flush=True)
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # What autovacuum does within minutes of a bulk load on a live server: statistics
            # for the planner and the visibility map that index-only scans (the counts) need.
            for table in ("agents_agent", "contexts_contextentry", "contexts_contexttag"):
                cursor.execute(f"VACUUM ANALYZE {table}")
        elif args.analyze:
            cursor.execute("ANALYZE")
    return {
        "loaded": True,
        "entries": args.entries,
        "tag_rows": tag_rows,
        "agents": len(owners),
        "load_seconds": round(time.perf_counter() - started, 1),
    }


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(ordered[-1], 2),
    }


def timed(function, repeat: int) -> dict:
    function()  # warm the cache: the figures are for a running server
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1000)
    return percentiles(samples)


def run_queries(args, rng: random.Random) -> dict:
    from django.utils import timezone

    from agents.models import Agent
    from contexts import services
    from contexts.models import ContextEntry

    agent_ids = list(
        Agent.objects.filter(agent_id__startswith="agent-").values_list("agent_id", flat=True)
    )
    reader = None  # an operator: reads every type, like an agent under the default policy
    rare_tags = [f"job-{n}" for n in range(max(ContextEntry.objects.count() // 20, 10))]

    def page(**filters):
        result = services.contexts_query(reader=reader, **filters)
        # The representation GET contexts/ answers.
        json.dumps([entry.as_dict() for entry in result.results])
        return result

    middle = ContextEntry.objects.order_by("-updated_at", "-id")[ContextEntry.objects.count() // 2]
    deep = services.Cursor(middle.updated_at, middle.id, 0, True)
    first = page(limit=100)
    next_cursor = services.Cursor.decode(first.next_cursor)
    keys = [f"state-{n}" for n in range(50)]

    queries = {
        "recent": lambda: page(limit=100),
        "recent_next_page": lambda: page(limit=100, cursor=next_cursor),
        "recent_limit_1000": lambda: page(limit=1000),
        "since_last_hour": lambda: page(since=timezone.now() - timedelta(hours=1)),
        "by_agent": lambda: page(agent_id=rng.choice(agent_ids)),
        "by_agent_and_type": lambda: page(
            agent_id=rng.choice(agent_ids), context_type=rng.choice(TYPES)
        ),
        "by_type": lambda: page(context_type=rng.choice(TYPES)),
        "by_tag_rare": lambda: page(tags=[rng.choice(rare_tags)]),
        "by_tag_common": lambda: page(tags=["env:prod"]),
        "by_tag_and_type": lambda: page(tags=["urgent"], context_type="error"),
        "by_key_all_owners": lambda: page(key=rng.choice(keys)),
        # Agents 0, 10, 20, ... hold the keyed entries.
        "by_agent_and_key": lambda: page(
            agent_id=rng.choice(agent_ids[::10]), key=rng.choice(keys)
        ),
        "deep_cursor_page": lambda: page(limit=100, cursor=deep),
    }
    figures = {name: timed(query, args.repeat) for name, query in queries.items()}

    writer = Agent.objects.get(agent_id=agent_ids[0])
    created = []

    def create():
        entry, _ = services.context_create(
            owner=writer,
            context_type="task_result",
            payload={"bench": True},
            tags=["bench", "env:prod"],
        )
        created.append(entry)

    figures["create"] = timed(create, args.repeat)
    versions = {}

    def update():
        entry = created[len(versions) % len(created)]
        version = versions.get(entry.pk, 1)
        services.context_update(
            context_id=entry.pk,
            writer=writer,
            expected_version=version,
            changes={"payload": {"bench": version + 1}},
        )
        versions[entry.pk] = version + 1

    figures["update"] = timed(update, args.repeat)
    return figures


def main() -> None:
    args = parse_args()
    setup_django(args)
    from django.db import connection

    rng = random.Random(args.seed)
    dataset = load(args, rng)
    figures = run_queries(args, rng)
    database = {"vendor": connection.vendor}
    if connection.vendor == "sqlite":
        import sqlite3

        database["version"] = sqlite3.sqlite_version
        database["file_mb"] = round(args.db.stat().st_size / 2**20, 1)
    else:
        connection.ensure_connection()
        database["version"] = getattr(connection, "pg_version", None)
    print(
        json.dumps(
            {"dataset": dataset, "database": database, "repeat": args.repeat, "queries": figures},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
