"""Two writers racing on one version: the conditional UPDATE lets exactly one through."""

import threading

import pytest
from django.db import connection

from contexts.models import ContextEntry, ContextVersion

from .conftest import detail_url, if_match

pytestmark = pytest.mark.django_db(transaction=True)

ROUNDS = 8


def race(calls):
    """Start every call at the same moment in its own thread (own connection); return results."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(index, call):
        try:
            barrier.wait(timeout=10)
            results[index] = call()
        except Exception as exc:  # the test inspects it
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_two_writers_with_the_same_if_match_exactly_one_wins(alice, share, as_agent):
    for round_number in range(ROUNDS):
        created = share(alice, payload={"round": round_number}).json()
        url = detail_url(created["context_id"])

        def write(name, url=url):
            return as_agent(alice).patch(
                url, {"payload": {"writer": name}}, format="json", headers=if_match(1)
            )

        first, second = race([lambda: write("one"), lambda: write("two")])
        statuses = sorted([first.status_code, second.status_code])
        assert statuses == [200, 412], (first.json(), second.json())
        winner = first if first.status_code == 200 else second
        loser = second if winner is first else first
        assert loser.json()["current_version"] == 2
        entry = ContextEntry.objects.get(pk=created["context_id"])
        assert entry.version == 2
        assert entry.payload == winner.json()["payload"]
        # The history holds version 1 once: only the winner recorded what it replaced.
        assert list(
            ContextVersion.objects.filter(entry=entry).values_list("version", flat=True)
        ) == [1]


def test_concurrent_keyed_upserts_all_land_as_successive_versions(alice, as_agent):
    def upsert(n):
        return as_agent(alice).post(
            "/api/v1/contexts/",
            {"context_type": "state_update", "key": "status", "payload": {"n": n}},
            format="json",
        )

    results = race([lambda n=n: upsert(n) for n in range(4)])
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 200, 201], [r.json() for r in results]
    entry = ContextEntry.objects.get(owner=alice.agent, key="status")
    assert entry.version == 4
    assert sorted(r.json()["version"] for r in results) == [1, 2, 3, 4]
