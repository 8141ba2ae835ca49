import re
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib import admin
from django.db import connection as db_connection
from django.db import connections as db_connections
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from agents import services
from agents.models import Agent, Connection, EnrollmentKey, IssuedToken, digest
from mcp_project.asgi import application
from security.models import AuditEvent

pytestmark = pytest.mark.django_db

RAW_KEY = re.compile(r"ek_[A-Za-z0-9_-]{43}")
RAW_SECRET = re.compile(r"as_[A-Za-z0-9_-]{43}")


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


def changelist(model):
    return reverse(f"admin:agents_{model._meta.model_name}_changelist")


def change(obj):
    return reverse(f"admin:agents_{obj._meta.model_name}_change", args=[obj.pk])


def run_action(client, model, action, objects, **extra):
    data = {"action": action, "_selected_action": [obj.pk for obj in objects], **extra}
    return client.post(changelist(model), data, follow=True)


def results(response):
    return list(response.context["cl"].result_list)


def open_connection(agent, channel_name="test.channel!1"):
    return services.connection_open(agent=agent, channel_name=channel_name, server="test")


# --- Pages render, secrets never do -------------------------------------------------------------


def test_every_registry_changelist_and_change_page_renders(operator_client, alice, bob):
    key, _ = services.enrollment_key_create(label="fleet", max_uses=3)
    connection = open_connection(alice.agent)
    token = IssuedToken.objects.filter(agent=alice.agent).first()
    for obj in (alice.agent, key, token, connection):
        listed = operator_client.get(changelist(type(obj)))
        assert listed.status_code == 200
        assert obj in results(listed)
        assert operator_client.get(change(obj)).status_code == 200


def test_agent_pages_never_show_the_secret_or_its_digest(operator_client, alice):
    for url in (changelist(Agent), change(alice.agent)):
        html = operator_client.get(url).content.decode()
        assert "alice" in html
        assert alice.secret not in html
        assert alice.agent.secret_digest not in html


def test_token_pages_show_only_a_token_id_prefix(operator_client, alice):
    token = IssuedToken.objects.get(agent=alice.agent, token_type=IssuedToken.Type.ACCESS)
    for url in (changelist(IssuedToken), change(token)):
        html = operator_client.get(url).content.decode()
        assert token.jti[:8] in html
        assert token.jti not in html
        assert alice.access not in html and alice.refresh not in html


def test_enrollment_key_pages_show_only_the_prefix(operator_client, operator):
    key, raw = services.enrollment_key_create(label="fleet", created_by=operator)
    for url in (changelist(EnrollmentKey), change(key)):
        html = operator_client.get(url).content.decode()
        assert key.prefix in html
        assert raw not in html
        assert key.key_digest not in html


def test_agent_page_links_to_its_tokens_and_key_page_to_its_agents(operator_client, bob):
    key, raw = services.enrollment_key_create(label="fleet")
    enrolled, _ = services.agent_register(agent_id="enrolled", enrollment_key=raw)
    services.tokens_issue(agent=enrolled)
    html = operator_client.get(change(enrolled)).content.decode()
    tokens_url = f"{changelist(IssuedToken)}?agent__exact={enrolled.pk}"
    assert tokens_url in html
    tokens = results(operator_client.get(tokens_url))
    assert len(tokens) == 2 and {t.agent for t in tokens} == {enrolled}
    agents_url = f"{changelist(Agent)}?enrolled_with__exact={key.pk}"
    assert agents_url in operator_client.get(change(key)).content.decode()
    assert results(operator_client.get(agents_url)) == [enrolled]


def test_agents_cannot_be_added_or_deleted_from_the_admin(operator_client, alice):
    assert operator_client.get(reverse("admin:agents_agent_add")).status_code == 403
    delete = reverse("admin:agents_agent_delete", args=[alice.agent.pk])
    assert operator_client.post(delete, {"post": "yes"}).status_code == 403
    assert Agent.objects.filter(pk=alice.agent.pk).exists()


# --- Agent list -----------------------------------------------------------------------------------


def test_agent_list_shows_derived_status_and_open_connection_count(operator_client, alice, bob):
    open_connection(alice.agent, "a.1")
    open_connection(alice.agent, "a.2")
    rows = {agent.agent_id: agent for agent in results(operator_client.get(changelist(Agent)))}
    assert rows["alice"].open_connection_count == 2
    assert rows["alice"].has_open_connection is True
    assert rows["bob"].open_connection_count == 0
    html = operator_client.get(changelist(Agent)).content.decode()
    assert "online" in html and "ocr, summarize" in html


def test_agent_list_filters_by_status(operator_client, alice, bob):
    open_connection(alice.agent)
    Agent.objects.filter(pk=bob.agent.pk).update(last_seen_at=None)
    online = results(operator_client.get(changelist(Agent), {"status": "online"}))
    offline = results(operator_client.get(changelist(Agent), {"status": "offline"}))
    assert [a.agent_id for a in online] == ["alice"]
    assert [a.agent_id for a in offline] == ["bob"]


def test_agent_list_searches_by_capability(operator_client, alice, bob, carol):
    found = results(operator_client.get(changelist(Agent), {"q": "ocr"}))
    assert sorted(a.agent_id for a in found) == ["alice", "carol"]


def test_agent_list_query_count_does_not_grow_with_agents(operator_client, make_agent):
    make_agent("a0", capabilities=["x"])
    open_connection(Agent.objects.get(agent_id="a0"))

    def queries():
        with CaptureQueriesContext(db_connection) as captured:
            assert operator_client.get(changelist(Agent)).status_code == 200
        return len(captured)

    few = queries()
    for n in range(1, 6):
        make_agent(f"a{n}", capabilities=["x", "y"])
        open_connection(Agent.objects.get(agent_id=f"a{n}"), f"c.{n}")
    assert queries() == few


# --- Agent edits and actions ----------------------------------------------------------------------


def change_form_data(agent, **fields):
    return {
        "name": agent.name,
        "description": agent.description,
        "metadata": "{}",
        "capabilities-TOTAL_FORMS": "0",
        "capabilities-INITIAL_FORMS": "0",
        "connections-TOTAL_FORMS": "0",
        "connections-INITIAL_FORMS": "0",
        **fields,
    }


def write_after_page_loads(monkeypatch, model, write):
    """Run `write` right after the admin loads the row it is about to save: a concurrent writer."""
    model_admin = admin.site._registry[model]
    load = model_admin.get_object

    def load_then_write(*args, **kwargs):
        obj = load(*args, **kwargs)
        write()
        return obj

    monkeypatch.setattr(model_admin, "get_object", load_then_write)


def test_editing_an_agent_keeps_liveness_written_meanwhile(
    operator_client, make_agent, monkeypatch
):
    dave = make_agent("dave").agent
    seen = timezone.now() + timedelta(seconds=5)
    write_after_page_loads(monkeypatch, Agent, lambda: services.agent_touch(agent=dave, at=seen))
    data = change_form_data(
        dave,
        name="Dave",
        **{
            "capabilities-TOTAL_FORMS": "1",
            "capabilities-0-name": "translate",
            "capabilities-0-version": "2",
        },
    )
    response = operator_client.post(change(dave), data)
    assert response.status_code == 302
    dave.refresh_from_db()
    assert dave.name == "Dave"
    assert dave.last_seen_at == seen
    assert [(c.name, c.version) for c in dave.capabilities.all()] == [("translate", "2")]


def test_editing_an_agent_cannot_change_its_state(operator_client, make_agent):
    dave = make_agent("dave").agent
    response = operator_client.post(change(dave), change_form_data(dave, state="disabled"))
    assert response.status_code == 302
    dave.refresh_from_db()
    assert dave.state == Agent.State.ACTIVE


def test_disable_action_disables_the_agent_and_revokes_its_tokens(
    operator_client, alice, bob, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = run_action(operator_client, Agent, "disable", [alice.agent])
    assert "Disabled 1 agent." in response.content.decode()
    alice.agent.refresh_from_db()
    assert alice.agent.state == Agent.State.DISABLED
    assert not IssuedToken.objects.filter(agent=alice.agent, revoked_at__isnull=True).exists()
    assert IssuedToken.objects.filter(agent=bob.agent, revoked_at__isnull=True).count() == 2
    with pytest.raises(services.TokenRejected):
        services.principal_from_access_token(alice.access)


def test_enable_action_reactivates_a_disabled_agent(operator_client, alice):
    services.agent_disable(agent=alice.agent)
    run_action(operator_client, Agent, "enable", [alice.agent])
    alice.agent.refresh_from_db()
    assert alice.agent.state == Agent.State.ACTIVE


def test_enable_action_leaves_a_deregistered_agent_retired(operator_client, alice):
    services.agent_deregister(agent=alice.agent)
    response = run_action(operator_client, Agent, "enable", [alice.agent])
    assert "Enabled 0 agents." in response.content.decode()
    alice.agent.refresh_from_db()
    assert alice.agent.state == Agent.State.DEREGISTERED


def test_disable_action_leaves_a_deregistered_agent_retired(operator_client, alice, bob):
    services.agent_deregister(agent=alice.agent)
    response = run_action(operator_client, Agent, "disable", [alice.agent, bob.agent])
    assert "Disabled 1 agent." in response.content.decode()
    run_action(operator_client, Agent, "enable", [alice.agent, bob.agent])
    alice.agent.refresh_from_db()
    assert alice.agent.state == Agent.State.DEREGISTERED


def test_deregister_action_retires_the_agent_and_keeps_it_listed(operator_client, alice):
    run_action(operator_client, Agent, "deregister", [alice.agent])
    alice.agent.refresh_from_db()
    assert alice.agent.state == Agent.State.DEREGISTERED
    assert not IssuedToken.objects.filter(agent=alice.agent, revoked_at__isnull=True).exists()
    assert alice.agent in results(operator_client.get(changelist(Agent)))


def test_revoke_tokens_action_revokes_every_token_but_keeps_the_agent_active(
    operator_client, alice, bob, django_capture_on_commit_callbacks
):
    services.tokens_issue(agent=alice.agent)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = run_action(operator_client, Agent, "revoke_tokens", [alice.agent])
    assert "Revoked 4 tokens." in response.content.decode()
    assert len(callbacks) == 1  # the sockets are asked to close once the revocation commits
    alice.agent.refresh_from_db()
    assert alice.agent.state == Agent.State.ACTIVE
    assert not IssuedToken.objects.filter(agent=alice.agent, revoked_at__isnull=True).exists()
    with pytest.raises(services.TokenRejected):
        services.principal_from_access_token(alice.access)
    assert services.principal_from_access_token(bob.access).agent == bob.agent


def test_rotate_secret_action_shows_the_new_secret_once(operator_client, alice):
    response = run_action(operator_client, Agent, "rotate_secret", [alice.agent])
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    shown = RAW_SECRET.findall(response.content.decode())
    assert len(shown) == 1
    new_secret = shown[0]
    assert services.agent_authenticate(agent_id="alice", secret=new_secret) == alice.agent
    with pytest.raises(services.TokenRejected):
        services.agent_authenticate(agent_id="alice", secret=alice.secret)
    with pytest.raises(services.TokenRejected):
        services.principal_from_access_token(alice.access)
    for url in (changelist(Agent), change(alice.agent)):
        assert new_secret not in operator_client.get(url).content.decode()


@pytest.mark.parametrize(
    "action, audited",
    [
        ("disable", "agent_disabled"),
        ("deregister", "agent_deregistered"),
        ("revoke_tokens", "tokens_revoked"),
        ("rotate_secret", "agent_secret_rotated"),
    ],
)
def test_agent_actions_are_audited_as_the_operator(operator_client, alice, action, audited):
    run_action(operator_client, Agent, action, [alice.agent])
    event = AuditEvent.objects.get(action=audited)
    assert (event.actor_type, event.actor, event.target) == ("operator", "operator", "alice")


# --- Enrollment keys ----------------------------------------------------------------------------


def test_adding_a_key_shows_it_once_and_stores_only_its_digest(operator_client, operator):
    response = operator_client.post(
        reverse("admin:agents_enrollmentkey_add"),
        {"label": "rack 7", "max_uses": "2", "expires_in": "3600"},
    )
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    shown = RAW_KEY.findall(response.content.decode())
    assert len(shown) == 1
    raw = shown[0]
    key = EnrollmentKey.objects.get()
    assert key.key_digest == digest(raw)
    assert raw.startswith(key.prefix)
    assert raw not in {key.label, key.prefix, key.key_digest}
    assert (key.label, key.max_uses, key.created_by) == ("rack 7", 2, operator)
    assert key.expires_at is not None
    for url in (changelist(EnrollmentKey), change(key)):
        html = operator_client.get(url).content.decode()
        assert raw not in html and key.key_digest not in html
    agent, _ = services.agent_register(agent_id="newcomer", enrollment_key=raw)
    assert agent.enrolled_with == key


@pytest.mark.parametrize(
    "field, value", [("max_uses", "0"), ("expires_in", "-5"), ("expires_in", "9" * 30)]
)
def test_adding_a_key_refuses_bad_limits(operator_client, field, value):
    response = operator_client.post(
        reverse("admin:agents_enrollmentkey_add"), {"label": "x", field: value}
    )
    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert not EnrollmentKey.objects.exists()
    assert not RAW_KEY.search(response.content.decode())


def test_editing_a_key_changes_only_its_label(operator_client, monkeypatch):
    key, raw = services.enrollment_key_create(label="old", max_uses=5)
    # A registration spends a use while the operator's save is in flight.
    write_after_page_loads(
        monkeypatch, EnrollmentKey, lambda: services.enrollment_key_consume(raw=raw)
    )
    response = operator_client.post(change(key), {"label": "new", "max_uses": "50"})
    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.label, key.uses, key.max_uses) == ("new", 1, 5)


def test_revoke_action_revokes_the_key(operator_client):
    key, raw = services.enrollment_key_create(label="fleet")
    other, other_raw = services.enrollment_key_create(label="other")
    run_action(operator_client, EnrollmentKey, "revoke", [key])
    key.refresh_from_db()
    assert key.get_status() == "revoked"
    with pytest.raises(services.EnrollmentRefused):
        services.agent_register(agent_id="late", enrollment_key=raw)
    early, _ = services.agent_register(agent_id="early", enrollment_key=other_raw)
    assert early.enrolled_with == other


def test_key_list_filters_by_status(operator_client):
    usable, _ = services.enrollment_key_create(label="usable")
    revoked, _ = services.enrollment_key_create(label="revoked")
    services.enrollment_key_revoke(key=revoked)
    spent, spent_raw = services.enrollment_key_create(label="spent", max_uses=1)
    services.enrollment_key_consume(raw=spent_raw)
    for status, key in (("usable", usable), ("revoked", revoked), ("spent", spent)):
        listed = results(operator_client.get(changelist(EnrollmentKey), {"status": status}))
        assert listed == [key]


# --- Tokens -------------------------------------------------------------------------------------


def test_revoke_action_revokes_only_the_selected_token(
    operator_client, alice, django_capture_on_commit_callbacks
):
    access = IssuedToken.objects.get(agent=alice.agent, token_type=IssuedToken.Type.ACCESS)
    second = services.tokens_issue(agent=alice.agent)
    with django_capture_on_commit_callbacks(execute=True):
        response = run_action(operator_client, IssuedToken, "revoke", [access])
    assert "Revoked 1 token." in response.content.decode()
    access.refresh_from_db()
    assert access.get_status() == "revoked"
    with pytest.raises(services.TokenRejected):
        services.principal_from_access_token(alice.access)
    assert services.principal_from_access_token(second["access"]).agent == alice.agent


def test_tokens_cannot_be_revoked_by_an_operator_who_may_only_view_them(
    client, django_user_model, alice
):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", password="pw-viewer-1", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_issuedtoken"))
    client.force_login(viewer)
    token = IssuedToken.objects.filter(agent=alice.agent).first()
    assert client.get(change(token)).status_code == 200
    run_action(client, IssuedToken, "revoke", [token])
    token.refresh_from_db()
    assert token.revoked_at is None


def test_tokens_are_read_only(operator_client, alice):
    token = IssuedToken.objects.filter(agent=alice.agent).first()
    assert operator_client.get(reverse("admin:agents_issuedtoken_add")).status_code == 403
    assert operator_client.post(change(token), {"token_type": "refresh"}).status_code == 403


# --- Connections --------------------------------------------------------------------------------


def test_connection_list_filters_open_and_closed(operator_client, alice):
    still_open = open_connection(alice.agent, "c.open")
    closed = open_connection(alice.agent, "c.closed")
    services.connection_closed(connection=closed, code=1000)
    assert results(operator_client.get(changelist(Connection), {"open": "yes"})) == [still_open]
    assert results(operator_client.get(changelist(Connection), {"open": "no"})) == [closed]


def test_disconnect_action_asks_open_connections_to_close(
    operator_client, alice, django_capture_on_commit_callbacks
):
    connection = open_connection(alice.agent)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = run_action(operator_client, Connection, "disconnect", [connection])
    assert response.status_code == 200
    assert "Asked 1 open connection to close." in response.content.decode()
    assert len(callbacks) == 1


async def connect(credentials):
    communicator = WebsocketCommunicator(application, "/ws/agent/", headers=credentials.ws_headers)
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from())["type"] == "welcome"
    return communicator


async def close_code(communicator):
    while True:
        event = await communicator.receive_output(timeout=3)
        if event["type"] == "websocket.close":
            return event.get("code")


async def operator_post_action(operator, model, action, objects):
    client = Client()
    await sync_to_async(client.force_login)(operator)
    return await sync_to_async(run_action)(client, model, action, objects)


@pytest.fixture
async def close_sync_thread_connections():
    yield
    # The admin request and the consumer's database calls ran in asgiref's sync thread, whose
    # persistent connection would otherwise block dropping the PostgreSQL test database.
    await sync_to_async(db_connections.close_all)()


@pytest.mark.django_db(transaction=True)
async def test_disconnect_action_closes_the_live_socket_normally(
    alice, bob, operator, close_sync_thread_connections
):
    socket = await connect(alice)
    other = await connect(bob)
    connection = await database_sync_to_async(Connection.objects.get)(agent=alice.agent)
    response = await operator_post_action(operator, Connection, "disconnect", [connection])
    assert response.status_code == 200
    assert await close_code(socket) == 1000
    assert await other.receive_nothing(timeout=0.2)
    await socket.disconnect()
    await other.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_disable_action_closes_the_agents_socket_for_good(
    alice, operator, close_sync_thread_connections
):
    socket = await connect(alice)
    await operator_post_action(operator, Agent, "disable", [alice.agent])
    assert await close_code(socket) == services.CLOSE_AGENT_DISABLED
    await socket.disconnect()
