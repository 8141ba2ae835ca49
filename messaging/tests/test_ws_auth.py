"""Who may open the agent WebSocket, and when the hub closes it again."""

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework_simplejwt.tokens import AccessToken

from agents import services as agent_services
from agents.models import Connection, IssuedToken
from ops.shutdown import live_consumers

from .conftest import closed_and_finished, communicator_for, connect, in_db, receive, request

pytestmark = pytest.mark.django_db(transaction=True)

CONSOLE = "https://console.example"


@pytest.fixture
def console_origin(hub_settings):
    hub_settings(ALLOWED_ORIGINS=[CONSOLE])
    return [(b"origin", CONSOLE.encode())]


async def refused_handshake(headers) -> bool:
    communicator = communicator_for(headers=headers)
    connected, _ = await communicator.connect()
    await communicator.disconnect()
    return not connected


async def closed_after_error(communicator, close_code, error_code="not_authenticated"):
    error = await receive(communicator)
    assert error["type"] == "error" and error["code"] == error_code, error
    assert await closed_and_finished(communicator) == close_code


def short_lived_token(agent, seconds: float) -> str:
    """Issue an access token for the agent that expires in `seconds`."""
    token = AccessToken()
    token["agent_id"] = agent.agent_id
    token.set_exp(lifetime=timedelta(seconds=seconds))
    now = timezone.now()
    IssuedToken.objects.create(
        jti=token["jti"],
        agent=agent,
        token_type=IssuedToken.Type.ACCESS,
        issued_at=now,
        expires_at=now + timedelta(seconds=seconds),
    )
    return str(token)


# --- Opening a session --------------------------------------------------------------------------


async def test_a_bearer_header_opens_a_session_with_a_welcome(alice):
    a, welcome = await connect(alice)
    assert welcome["agent_id"] == "alice" and welcome["pending"] == 0
    assert welcome["session_id"] and welcome["server_time"].endswith("Z")
    assert welcome["heartbeat_interval"] >= 1
    await a.disconnect()


async def test_a_first_frame_token_opens_a_session_from_an_allowed_origin(alice, console_origin):
    communicator = communicator_for(headers=console_origin)
    connected, _ = await communicator.connect()
    assert connected
    welcome = await request(communicator, {"type": "auth", "token": alice.access, "ref": "a"})
    assert welcome["type"] == "welcome" and welcome["agent_id"] == "alice"
    heartbeat = await request(communicator, {"type": "heartbeat", "ref": "h"})
    assert heartbeat["type"] == "heartbeat_ack"
    await communicator.disconnect()


async def test_a_socket_keeps_no_handshake_header_and_its_session_records_the_user_agent(
    alice, console_origin
):
    communicator = communicator_for(headers=[*console_origin, (b"user-agent", b"agent-sdk/2.0")])
    connected, _ = await communicator.connect()
    assert connected
    # The session opens after connect, by an auth frame: the user agent was read at connect.
    welcome = await request(communicator, {"type": "auth", "token": alice.access, "ref": "a"})
    connection = await in_db(Connection.objects.get)(session_id=welcome["session_id"])
    [consumer] = [
        c for c in live_consumers if c.connection is not None and c.connection.pk == connection.pk
    ]
    assert consumer.scope["headers"] == ()
    # Nor does the consumer's suspended coroutine keep the scope it was called with.
    assert "scope" not in communicator.future.get_coro().cr_frame.f_locals
    assert connection.user_agent == "agent-sdk/2.0"
    await communicator.disconnect()


async def test_an_origin_off_the_allowlist_is_refused_even_with_a_bearer_header(
    alice, console_origin
):
    assert await refused_handshake([(b"origin", b"https://evil.example"), *alice.ws_headers])
    assert await refused_handshake([(b"origin", b"https://evil.example")])


async def test_an_allowed_origin_may_also_use_a_bearer_header(alice, console_origin):
    a, welcome = await connect(alice, headers=[*console_origin, *alice.ws_headers])
    assert welcome["agent_id"] == "alice"
    await a.disconnect()


async def test_a_handshake_without_origin_or_bearer_header_is_refused(alice):
    assert await refused_handshake([])
    assert await refused_handshake([(b"authorization", b"Basic YWxpY2U6eA==")])


async def test_no_authentication_in_time_closes_with_4408(console_origin, hub_settings):
    hub_settings(AUTH_TIMEOUT=1)
    communicator = communicator_for(headers=console_origin)
    assert (await communicator.connect())[0]
    started = time.monotonic()
    await closed_after_error(communicator, 4408)
    assert 0.8 < time.monotonic() - started < 3


async def test_a_frame_before_authentication_closes_with_4401(console_origin):
    communicator = communicator_for(headers=console_origin)
    await communicator.connect()
    await communicator.send_json_to({"type": "heartbeat"})
    await closed_after_error(communicator, 4401)


async def test_a_malformed_frame_before_authentication_is_answered_and_auth_still_works(
    alice, console_origin
):
    communicator = communicator_for(headers=console_origin)
    await communicator.connect()
    await communicator.send_to(text_data="{nope")
    assert (await receive(communicator))["code"] == "invalid_json"
    welcome = await request(communicator, {"type": "auth", "token": alice.access})
    assert welcome["type"] == "welcome"
    await communicator.disconnect()


async def test_a_bad_token_closes_with_4401(console_origin):
    for token in ("garbage", "a.b.c", "x" * 5000):
        header = communicator_for(headers=[(b"authorization", f"Bearer {token}".encode())])
        assert (await header.connect())[0]
        await closed_after_error(header, 4401)
        frame = communicator_for(headers=console_origin)
        await frame.connect()
        await frame.send_json_to({"type": "auth", "token": token, "ref": "a"})
        error = await receive(frame)
        assert error["code"] == "not_authenticated" and error["ref"] == "a"
        assert await closed_and_finished(frame) == 4401


async def test_a_revoked_token_closes_with_4401(alice):
    await in_db(lambda: IssuedToken.objects.update(revoked_at=timezone.now()))()
    communicator = communicator_for(alice)
    await communicator.connect()
    await closed_after_error(communicator, 4401)


async def test_an_expired_token_is_refused_with_4401(alice):
    token = await in_db(short_lived_token)(alice.agent, -5)
    communicator = communicator_for(headers=[(b"authorization", f"Bearer {token}".encode())])
    await communicator.connect()
    await closed_after_error(communicator, 4401)


@pytest.mark.parametrize("retire", ["agent_disable", "agent_deregister"])
async def test_the_token_of_a_disabled_or_deregistered_agent_closes_with_4403(alice, retire):
    await in_db(getattr(agent_services, retire))(agent=alice.agent)
    communicator = communicator_for(alice)
    await communicator.connect()
    await closed_after_error(communicator, 4403, error_code="forbidden")


async def test_an_operator_token_cannot_open_an_agent_session(operator_tokens):
    headers = [(b"authorization", f"Bearer {operator_tokens['access']}".encode())]
    communicator = communicator_for(headers=headers)
    await communicator.connect()
    await closed_after_error(communicator, 4403, error_code="forbidden")


async def test_authenticating_twice_is_an_invalid_frame(alice):
    a, _ = await connect(alice)
    answer = await request(a, {"type": "auth", "token": alice.access, "ref": "again"})
    assert answer["code"] == "invalid_frame" and answer["field"] == "type"
    assert (await request(a, {"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await a.disconnect()


# --- Closing a live session ---------------------------------------------------------------------


@pytest.mark.parametrize("retire", ["agent_disable", "agent_deregister"])
async def test_retiring_an_agent_closes_its_live_sockets_with_4403(alice, retire):
    first, _ = await connect(alice)
    second, _ = await connect(alice)
    started = time.monotonic()
    await in_db(getattr(agent_services, retire))(agent=alice.agent)
    for session in (first, second):
        await closed_after_error(session, 4403, error_code="forbidden")
    assert time.monotonic() - started < 5


async def test_revoking_a_token_closes_only_the_sockets_opened_with_it(alice):
    other_access = (await in_db(agent_services.tokens_issue)(agent=alice.agent))["access"]
    revoked, _ = await connect(alice)
    kept, _ = await connect(alice, headers=[(b"authorization", f"Bearer {other_access}".encode())])

    def revoke():
        token = IssuedToken.objects.get(
            jti=AccessToken(alice.access)["jti"], token_type=IssuedToken.Type.ACCESS
        )
        agent_services.token_revoke(token=token)

    await in_db(revoke)()
    await closed_after_error(revoked, 4401)
    assert (await request(kept, {"type": "heartbeat"}))["type"] == "heartbeat_ack"
    await kept.disconnect()


async def test_the_socket_closes_with_4401_when_its_token_expires(alice):
    lifetime = 4
    token = await in_db(short_lived_token)(alice.agent, lifetime)
    started = time.monotonic()
    session, _ = await connect(alice, headers=[(b"authorization", f"Bearer {token}".encode())])
    error = await receive(session, timeout=lifetime + 5)
    assert error["code"] == "not_authenticated" and "expired" in error["detail"]
    assert await closed_and_finished(session) == 4401
    # Closed when the token ran out, not at some later frame or sweep.
    assert lifetime - 1 <= time.monotonic() - started < lifetime + 3


async def test_sockets_whose_tokens_expire_together_close_together_on_one_timer(alice):
    from messaging.consumers import token_expiries

    lifetime = 3
    token = await in_db(short_lived_token)(alice.agent, lifetime)
    headers = [(b"authorization", f"Bearer {token}".encode())]
    first, _ = await connect(alice, headers=headers)
    second, _ = await connect(alice, headers=headers)
    leaving, _ = await connect(alice, headers=headers)
    [(_, (timer, consumers))] = token_expiries._due.items()
    assert len(consumers) == 3
    await leaving.disconnect()
    assert len(consumers) == 2 and not timer.cancelled()
    for session in (first, second):
        error = await receive(session, timeout=lifetime + 5)
        assert error["code"] == "not_authenticated" and "expired" in error["detail"]
        assert await closed_and_finished(session) == 4401
    assert not token_expiries._due


async def test_a_socket_that_closes_before_its_token_expires_leaves_no_timer(alice):
    from messaging.consumers import token_expiries

    session, _ = await connect(alice)
    assert len(token_expiries._due) == 1
    await session.disconnect()
    assert not token_expiries._due
