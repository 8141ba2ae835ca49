"""GET /api/v1/agents/ and /api/v1/agents/{agent_id}/: discovery and profiles."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from agents import services
from agents.models import Agent, Capability, Connection

URL = "/api/v1/agents/"


def ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [profile["agent_id"] for profile in response.json()["results"]]


def long_ago():
    return timezone.now() - timedelta(hours=1)


def open_connection(credentials) -> Connection:
    return services.connection_open(
        agent=credentials.agent, channel_name=f"test.{credentials.agent_id}", server="test"
    )


@pytest.fixture
def cast(alice, bob, carol):
    """Alice (ocr, summarize), Bob (credit-score), Carol (ocr); all silent for an hour."""
    Agent.objects.update(last_seen_at=long_ago())
    return alice, bob, carol


# --- Listing and filters ------------------------------------------------------------------------


def test_it_lists_active_agents_with_their_profiles(as_agent, cast):
    alice, *_ = cast
    response = as_agent(alice).get(URL)
    assert ids(response) == ["alice", "bob", "carol"]
    body = response.json()
    assert body["count"] == 3
    first = body["results"][0]
    assert first["capabilities"] == [
        {"name": "ocr", "version": "", "description": ""},
        {"name": "summarize", "version": "", "description": ""},
    ]
    assert first["name"] == "Alice" and first["status"] == "offline" and first["state"] == "active"


def test_it_lists_only_active_agents(as_agent, cast):
    alice, bob, carol = cast
    services.agent_deregister(agent=bob.agent)
    services.agent_disable(agent=carol.agent)
    assert ids(as_agent(alice).get(URL)) == ["alice"]


def test_it_filters_by_one_capability(as_agent, cast):
    assert ids(as_agent(cast[0]).get(URL, {"capability": "ocr"})) == ["alice", "carol"]


def test_it_requires_every_repeated_capability(as_agent, cast):
    response = as_agent(cast[0]).get(f"{URL}?capability=ocr&capability=summarize")
    assert ids(response) == ["alice"]
    assert response.json()["count"] == 1


def test_it_finds_nobody_for_an_unknown_capability(as_agent, cast):
    response = as_agent(cast[0]).get(URL, {"capability": "telepathy"})
    assert ids(response) == [] and response.json()["count"] == 0


def test_an_agent_with_an_open_connection_is_online(as_agent, cast):
    alice, bob, _ = cast
    open_connection(bob)
    # The last sign of life is old; the open socket alone makes bob online.
    Agent.objects.filter(pk=bob.agent.pk).update(last_seen_at=long_ago())
    assert ids(as_agent(alice).get(URL, {"status": "online"})) == ["bob"]
    assert ids(as_agent(alice).get(URL, {"status": "offline"})) == ["alice", "carol"]


def test_an_agent_with_a_recent_heartbeat_is_online(as_agent, cast):
    alice, _, carol = cast
    services.agent_touch(agent=carol.agent)
    assert ids(as_agent(alice).get(URL, {"status": "online"})) == ["carol"]
    profile = as_agent(alice).get(f"{URL}carol/").json()
    assert profile["status"] == "online"


def test_an_agent_whose_connection_closed_and_heartbeat_aged_is_offline(as_agent, cast):
    alice, bob, _ = cast
    connection = open_connection(bob)
    services.connection_closed(connection=connection, code=1000)
    Agent.objects.filter(pk=bob.agent.pk).update(last_seen_at=long_ago())
    assert ids(as_agent(alice).get(URL, {"status": "online"})) == []
    assert "bob" in ids(as_agent(alice).get(URL, {"status": "offline"}))


def test_an_agent_that_never_showed_up_is_offline(as_agent, cast):
    alice, *_ = cast
    Agent.objects.filter(agent_id="bob").update(last_seen_at=None)
    assert ids(as_agent(alice).get(URL, {"status": "offline"})) == ["alice", "bob", "carol"]


def test_it_answers_400_for_an_unknown_status(as_agent, cast):
    response = as_agent(cast[0]).get(URL, {"status": "asleep"})
    assert response.status_code == 400
    assert "status" in response.json()["errors"]


def test_it_combines_status_and_capability(as_agent, cast):
    alice, _, carol = cast
    open_connection(carol)
    response = as_agent(alice).get(URL, {"status": "online", "capability": "ocr"})
    assert ids(response) == ["carol"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ALI", ["alice"]),  # agent_id, case-insensitive
        ("carol", ["carol"]),  # name
        ("credit", ["bob"]),  # a capability's name
        ("invoices", ["bob"]),  # description
        ("ocr", ["alice", "carol"]),
        ("nothing-like-it", []),
    ],
)
def test_it_searches_ids_names_descriptions_and_capabilities(as_agent, cast, text, expected):
    Agent.objects.filter(agent_id="bob").update(description="Scores invoices.")
    response = as_agent(cast[0]).get(URL, {"search": text})
    assert ids(response) == expected
    assert response.json()["count"] == len(expected)


def test_a_search_matching_two_capabilities_lists_the_agent_once(as_agent, make_agent):
    viewer = make_agent("viewer")
    make_agent("multi", capabilities=["pdf-read", "pdf-write"])
    response = as_agent(viewer).get(URL, {"search": "pdf"})
    assert ids(response) == ["multi"] and response.json()["count"] == 1


def test_it_paginates_with_limit_and_offset(as_agent, make_agent):
    viewer = make_agent("viewer")
    for n in range(5):
        make_agent(f"worker-{n}")
    response = as_agent(viewer).get(URL, {"limit": 2, "offset": 1})
    assert ids(response) == ["worker-0", "worker-1"]
    assert response.json()["count"] == 6
    last = as_agent(viewer).get(URL, {"limit": 2, "offset": 5})
    assert ids(last) == ["worker-4"]


def test_it_counts_filtered_results_not_the_page(as_agent, make_agent):
    viewer = make_agent("viewer")
    for n in range(4):
        make_agent(f"worker-{n}", capabilities=["ocr"])
    response = as_agent(viewer).get(URL, {"capability": "ocr", "limit": 1})
    assert response.json()["count"] == 4 and len(ids(response)) == 1


def test_it_lists_twenty_agents_in_a_fixed_number_of_queries(
    as_agent, make_agent, django_assert_max_num_queries
):
    viewer = make_agent("viewer")
    for n in range(20):
        worker = make_agent(f"worker-{n:02}", capabilities=["ocr", f"skill-{n}", "summarize"])
        if n % 2:
            open_connection(worker)
    Agent.objects.update(last_seen_at=long_ago())
    client = as_agent(viewer)
    # Authentication (1), count (1), page (1), capabilities prefetch (1), and some slack.
    with django_assert_max_num_queries(6):
        response = client.get(URL, {"limit": 100})
    results = response.json()["results"]
    assert len(results) == 21
    # The viewer sorts first ("viewer" < "worker-00") and has no capabilities.
    assert [len(p["capabilities"]) for p in results] == [0] + [3] * 20
    assert [p["status"] for p in results[1:5]] == ["offline", "online", "offline", "online"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-5"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": "1.5"}, "offset"),
    ],
)
def test_it_refuses_a_limit_or_offset_out_of_range(as_agent, cast, query, field):
    response = as_agent(cast[0]).get(URL, query)
    assert response.status_code == 400
    assert field in response.json()["errors"]


def test_it_accepts_the_largest_page_and_an_offset_past_the_end(as_agent, cast):
    assert len(ids(as_agent(cast[0]).get(URL, {"limit": 500}))) == 3
    response = as_agent(cast[0]).get(URL, {"offset": 50})
    assert ids(response) == [] and response.json()["count"] == 3


def test_an_operator_can_discover_agents(api, operator_tokens, cast):
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {operator_tokens['access']}")
    assert ids(api.get(URL)) == ["alice", "bob", "carol"]


@pytest.mark.parametrize(("perms", "expected"), [((), 403), (("view_agent",), 200)])
def test_operators_discover_under_the_view_agent_permission(
    api, django_user_model, cast, perms, expected
):
    from django.contrib.auth.models import Permission

    clerk = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    clerk.user_permissions.set(Permission.objects.filter(codename__in=perms))
    api.credentials(
        HTTP_AUTHORIZATION=f"Bearer {services.operator_tokens_issue(user=clerk)['access']}"
    )
    assert api.get(URL).status_code == expected
    assert api.get(f"{URL}bob/").status_code == expected


def test_discovery_requires_authentication(api, cast):
    response = api.get(URL)
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"


# --- One profile --------------------------------------------------------------------------------


def test_it_reads_one_profile(as_agent, cast):
    alice, *_ = cast
    response = as_agent(alice).get(f"{URL}bob/")
    assert response.status_code == 200
    body = response.json()
    assert body["agent_id"] == "bob" and body["name"] == "Bob"
    assert body["capabilities"] == [{"name": "credit-score", "version": "", "description": ""}]
    assert "secret_digest" not in body and "agent_secret" not in body


def test_it_answers_404_for_an_unknown_agent(as_agent, cast):
    response = as_agent(cast[0]).get(f"{URL}nobody/")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_it_answers_404_for_a_deregistered_agent(as_agent, cast):
    alice, bob, _ = cast
    services.agent_deregister(agent=bob.agent)
    assert as_agent(alice).get(f"{URL}bob/").status_code == 404


def test_reading_a_profile_requires_authentication(api, cast):
    assert api.get(f"{URL}bob/").status_code == 401


@pytest.mark.parametrize("page_size", [1, 25, 500])
@pytest.mark.parametrize(
    "query",
    [{}, {"capability": "ocr"}, {"status": "online"}, {"search": "skill"}],
    ids=["all", "capability", "status", "search"],
)
def test_a_discovery_page_costs_four_queries_whatever_its_size(
    as_agent, make_agent, django_assert_num_queries, page_size, query
):
    viewer = make_agent("viewer")
    for n in range(30):
        worker = make_agent(f"worker-{n:02}", capabilities=["ocr", f"skill-{n}"])
        open_connection(worker)
    Agent.objects.filter(agent_id="viewer").update(last_seen_at=None)
    client = as_agent(viewer)
    # Authentication, count, page, and the capabilities of the whole page.
    with django_assert_num_queries(4):
        response = client.get(URL, {**query, "limit": page_size})
    matches = 30 if query else 31  # every filter leaves out the viewer
    assert len(ids(response)) == min(page_size, matches)
    assert response.json()["count"] == matches


def test_a_discovery_page_reads_no_secret_and_counts_without_distinct(
    as_agent, make_agent, django_assert_num_queries
):
    viewer = make_agent("viewer")
    make_agent("multi", capabilities=["pdf-read", "pdf-write"])
    client = as_agent(viewer)
    with django_assert_num_queries(4) as captured:
        response = client.get(URL, {"search": "pdf", "capability": "pdf-read"})
    assert ids(response) == ["multi"] and response.json()["count"] == 1
    # The first query is authentication, which loads the caller itself.
    discovery = [query["sql"] for query in captured.captured_queries[1:]]
    # DISTINCT over whole rows (JSON metadata included) made every count a sort of the matches.
    assert not any("DISTINCT" in sql.upper() for sql in discovery)
    assert not any("secret_digest" in sql for sql in discovery)


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata"])
def test_discovery_renders_profiles_as_the_profile_endpoint_does(as_agent, make_agent, zone):
    from agents.serializers import AgentProfileSerializer
    from agents.views import profiles

    viewer = make_agent("viewer")
    rich = make_agent(
        "rich",
        name="Rich Ünicode",
        description="Reads <everything>.",
        metadata={"region": "eu", "weights": [1.5, 2], "nested": {"ok": True, "none": None}},
    )
    services.agent_update(
        agent=rich.agent,
        capabilities=[
            {"name": "zeta", "version": "2.1", "description": "last by name"},
            {"name": "alpha", "version": "", "description": "first by name"},
        ],
    )
    services.agent_touch(agent=rich.agent)
    open_connection(rich)
    Agent.objects.filter(agent_id="viewer").update(last_seen_at=None)
    with timezone.override(zone):
        response = as_agent(viewer).get(URL)
        expected = AgentProfileSerializer(profiles().active(), many=True).data
    assert response.status_code == 200
    assert response.json()["results"] == expected
    assert [p["status"] for p in expected] == ["online", "offline"]


@pytest.mark.parametrize(
    ("has_open_connection", "seen_seconds_ago", "expected"),
    [
        (True, None, "online"),
        (True, 3600, "online"),
        (False, 10, "online"),
        (False, 3600, "offline"),
        (False, None, "offline"),
    ],
)
def test_status_is_derived_from_connection_and_last_sign_of_life(
    has_open_connection, seen_seconds_ago, expected
):
    now = timezone.now()
    cutoff = now - timedelta(seconds=90)
    seen = now - timedelta(seconds=seen_seconds_ago) if seen_seconds_ago is not None else None
    status = Agent.status_from(
        has_open_connection=has_open_connection, last_seen_at=seen, cutoff=cutoff
    )
    assert status == expected


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's planner")
@pytest.mark.django_db
def test_discovery_by_capability_looks_up_its_holders_by_key_among_many_agents():
    # 10,000 agents, each capability held by 100 of them (as bench rest provisions them).
    agents = Agent.objects.bulk_create(
        Agent(agent_id=f"agent-{n:05d}", name=f"Agent {n}", secret_digest="-")
        for n in range(10_000)
    )
    Capability.objects.bulk_create(
        Capability(agent=agent, name=f"cap-{n % 100:03d}") for n, agent in enumerate(agents)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE agents_agent, agents_capability")
    holders = Agent.objects.active().with_capabilities(["cap-044"])
    page = holders.profile_values().order_by("agent_id")[:50]
    for plan in (page.explain(), holders.order_by().values("pk").explain()):
        # At PostgreSQL's default random_page_cost, a sequential scan of every agent.
        assert "Seq Scan on agents_agent" not in plan, plan
        assert "agents_agent_pkey" in plan, plan
    assert len(page) == 50 and holders.count() == 100
