"""The security rules as a real client meets them: two daphne processes, one Redis, one database.

One hub serves the whole module (it starts in a few seconds); each test registers agents of its
own. Operators act through the real admin over HTTP, with a real session, as a browser would.
"""

import asyncio
import contextlib
import http.cookiejar
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.e2e.harness import (
    ROOT,
    AgentSocket,
    Hub,
    SocketClosed,
    embedded_redis,
    wait_for_drops,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(embedded_redis.find_redis_server() is None, reason="no redis-server"),
]

ORIGIN = "https://console.example"
MAX_FRAME = 65536
MAX_PAYLOAD = 16384
WS_BURST = 20
WS_ABUSE_LIMIT = 10
OPERATOR = ("sec-operator", "sec-operator-password-1")
ENV = {
    "HUB_AUTH_TIMEOUT": "1",
    "HUB_ALLOWED_ORIGINS": ORIGIN,
    "HUB_MAX_FRAME_BYTES": str(MAX_FRAME),
    "HUB_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
    # One frame a second refills the bucket: a burst of frames sent at once meets the limit.
    "HUB_WS_RATE": "1",
    "HUB_WS_BURST": str(WS_BURST),
    "HUB_WS_ABUSE_LIMIT": str(WS_ABUSE_LIMIT),
    "HUB_MAX_CONNECTIONS_PER_AGENT": "2",
    "HUB_THROTTLE_REGISTER": "10000/min",
    "HUB_THROTTLE_TOKEN": "10000/min",
    # INFO, so the log search below has every request and registration line to look through.
    "HUB_LOG_LEVEL": "INFO",
}


@pytest.fixture(scope="module")
def hub():
    running = Hub(servers=2, env=ENV)
    try:
        running.start()
        running.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model; "
            f"get_user_model().objects.create_superuser({OPERATOR[0]!r}, '', {OPERATOR[1]!r})",
        )
        yield running
    finally:
        running.stop(wait_for_drop=False)
        wait_for_drops()


# --- An operator in a browser ---------------------------------------------------------------------


class Browser:
    """An operator's browser: cookies, CSRF tokens and forms, against one server of the hub."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)

    def get(self, path: str) -> str:
        with self.opener.open(self.base_url + path, timeout=10) as answer:
            return answer.read().decode()

    def post(self, path: str, fields: dict) -> str:
        fields = {**fields, "csrfmiddlewaretoken": self.cookie("csrftoken")}
        data = urllib.parse.urlencode(fields, doseq=True).encode()
        request = urllib.request.Request(self.base_url + path, data=data)  # noqa: S310 (local)
        with self.opener.open(request, timeout=10) as answer:
            return answer.read().decode()

    def log_in(self, username: str, password: str) -> "Browser":
        self.get("/admin/login/")  # sets the CSRF cookie
        page = self.post(
            "/admin/login/?next=/admin/",
            {"username": username, "password": password, "next": "/admin/"},
        )
        assert "Log out" in page or "logout" in page, page[:500]
        assert self.cookie("sessionid")
        return self

    def agent_pk(self, agent_id: str) -> int:
        page = self.get(f"/admin/agents/agent/?q={agent_id}")
        return int(re.search(r"/admin/agents/agent/(\d+)/change/", page).group(1))

    def agent_action(self, action: str, agent_id: str) -> str:
        pk = self.agent_pk(agent_id)
        return self.post(
            "/admin/agents/agent/", {"action": action, "_selected_action": [pk], "index": "0"}
        )


@pytest.fixture(scope="module")
def browser(hub) -> Browser:
    return Browser(hub.url(0)).log_in(*OPERATOR)


# --- Helpers --------------------------------------------------------------------------------------


async def open_raw(url, *, headers=None, origin=None):
    """Open a socket with exactly these headers; return an AgentSocket reading it."""
    ws = await ws_connect(
        url,
        additional_headers=headers,
        origin=origin,
        open_timeout=10,
        ping_interval=None,
        close_timeout=2,
        max_size=2**24,
    )
    return AgentSocket(ws)


async def refused_handshake(url, *, headers=None, origin=None) -> int:
    """Return the HTTP status with which the server refused the WebSocket handshake."""
    with pytest.raises(InvalidStatus) as refused:
        sock = await open_raw(url, headers=headers, origin=origin)
        await sock.close()
    return refused.value.response.status_code


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def run(function, *args, **kwargs):
    return await asyncio.to_thread(function, *args, **kwargs)


def issue_token_in_subprocess(hub: Hub, agent_id: str, lifetime: int) -> str:
    """Issue an access token as the hub does, with JWT_ACCESS_LIFETIME set to `lifetime`."""
    code = (
        "from agents.models import Agent; from agents.services import tokens_issue; "
        f"print(tokens_issue(agent=Agent.objects.get(agent_id={agent_id!r}))['access'])"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "shell", "-c", code],
        cwd=ROOT,
        env=hub.env(JWT_ACCESS_LIFETIME=str(lifetime), HUB_LOG_LEVEL="WARNING"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


# --- Origin ---------------------------------------------------------------------------------------


async def test_a_present_origin_must_be_on_the_allowlist_even_with_a_bearer_header(hub):
    agent = await run(hub.register)
    status = await refused_handshake(
        hub.ws_url(0), headers=bearer(agent.access), origin="https://evil.example"
    )
    assert status == 403
    # Exact match only: a look-alike is refused too.
    status = await refused_handshake(
        hub.ws_url(1), headers=bearer(agent.access), origin=ORIGIN + ".evil.example"
    )
    assert status == 403


async def test_no_origin_is_refused_without_a_bearer_header(hub):
    assert await refused_handshake(hub.ws_url(0)) == 403


async def test_no_origin_with_a_bearer_header_is_a_non_browser_agent_and_welcome(hub):
    agent = await run(hub.register)
    async with await AgentSocket.connect(hub.ws_url(1), agent.access) as sock:
        assert sock.welcome["agent_id"] == agent.agent_id


async def test_an_allowed_origin_authenticates_with_its_first_frame(hub):
    agent = await run(hub.register)
    async with await open_raw(hub.ws_url(0), origin=ORIGIN) as sock:
        await sock.send_frame({"type": "auth", "token": agent.access})
        welcome = await sock.next_event()
        assert welcome["type"] == "welcome" and welcome["agent_id"] == agent.agent_id


# --- A browser's session cookie is not a credential -----------------------------------------------


async def test_a_session_cookie_without_a_valid_origin_is_refused(hub, browser):
    cookie = {"Cookie": f"sessionid={browser.cookie('sessionid')}"}
    assert await refused_handshake(hub.ws_url(0), headers=cookie) == 403
    assert (
        await refused_handshake(hub.ws_url(0), headers=cookie, origin="https://evil.example") == 403
    )


async def test_a_session_cookie_from_an_allowed_origin_authenticates_nothing(hub, browser):
    cookie = {"Cookie": f"sessionid={browser.cookie('sessionid')}"}
    # The operator's logged-in browser: the socket opens, but only a token would authenticate it.
    async with await open_raw(hub.ws_url(0), headers=cookie, origin=ORIGIN) as sock:
        await sock.send_frame({"type": "heartbeat"})
        answer = await sock.next_event()
        assert answer["type"] == "error" and answer["code"] == "not_authenticated"
        assert await sock.wait_closed(timeout=5) == 4401
        assert sock.welcome is None and not sock.messages
    async with await open_raw(hub.ws_url(1), headers=cookie, origin=ORIGIN) as sock:
        assert await sock.wait_closed(timeout=5) == 4408  # nothing more in time
    # Nor is it a credential over REST.
    answer = await run(hub.http, "GET", "/api/v1/agents/", headers=cookie)
    assert answer.status == 401


# --- Frame and payload sizes ----------------------------------------------------------------------


async def test_a_frame_over_the_transport_limit_closes_with_1009_before_it_is_parsed(hub):
    agent = await run(hub.register)
    async with await AgentSocket.connect(hub.ws_url(0), agent.access) as sock:
        # Not even JSON: an app that parsed it would answer invalid_json instead.
        await sock.send_raw("{" * (MAX_FRAME + 1))
        assert await sock.wait_closed(timeout=5) == 1009
    # The same for a socket that has not authenticated yet.
    async with await open_raw(hub.ws_url(1), origin=ORIGIN) as sock:
        with contextlib.suppress(ConnectionClosed):
            await sock.send_raw("x" * (MAX_FRAME * 4))
        assert await sock.wait_closed(timeout=5) == 1009


async def test_a_payload_over_the_limit_answers_payload_too_large_and_the_socket_stays(hub):
    sender, recipient = await run(hub.register), await run(hub.register)
    async with await AgentSocket.connect(hub.ws_url(0), sender.access) as sock:
        frame = {"type": "send", "to": recipient.agent_id, "payload": "x" * (MAX_PAYLOAD + 1)}
        answer = await sock.call({**frame, "ref": "big"})
        assert answer["code"] == "payload_too_large" and answer["ref"] == "big"
        assert (await sock.call({"type": "heartbeat"}))["type"] == "heartbeat_ack"
        small = await sock.send_to(recipient.agent_id, {"ok": True})
        assert small["type"] == "accepted"
    # REST refuses a body over the frame limit with 413 before parsing it.
    too_big = await run(
        hub.http,
        "POST",
        "/api/v1/messages/",
        token=sender.access,
        body={"to": recipient.agent_id, "payload": "x" * MAX_FRAME},
    )
    assert too_big.status == 413


# --- Rate and connection limits -------------------------------------------------------------------


async def test_excess_frames_answer_rate_limited_and_sustained_abuse_closes_with_4429(hub):
    agent = await run(hub.register)
    sock = await AgentSocket.connect(hub.ws_url(1), agent.access)
    try:
        # Sent at once, answered in order: the burst is served, the frames past it refused.
        pending = [
            await sock.send_frame({"type": "heartbeat", "ref": f"h{i}"})
            for i in range(WS_BURST + 3)
        ]
        answers = [await asyncio.wait_for(future, 10) for future in pending]
        kinds = [a.get("code", a["type"]) for a in answers]
        assert kinds[:WS_BURST] == ["heartbeat_ack"] * WS_BURST
        assert kinds[-1] == "rate_limited"
        refused = answers[-1]
        assert refused["ref"] == f"h{WS_BURST + 2}" and 0 < refused["retry_after"] <= 1
        # Ignoring retry_after: the socket is closed once the refusals in a row reach the limit.
        with contextlib.suppress(SocketClosed, ConnectionClosed):
            for _ in range(WS_ABUSE_LIMIT + 5):
                await sock.send_frame({"type": "heartbeat"})
        assert await sock.wait_closed(timeout=5) == 4429
    finally:
        await sock.close()


async def test_a_connection_over_the_per_agent_limit_closes_with_4409_across_servers(hub):
    agent = await run(hub.register)
    first = await AgentSocket.connect(hub.ws_url(0), agent.access)
    second = await AgentSocket.connect(hub.ws_url(1), agent.access)
    try:
        async with await AgentSocket.open(hub.ws_url(0), token=agent.access) as third:
            error = await third.next_event()
            assert error["type"] == "error"
            assert await third.wait_closed(timeout=5) == 4409
        # The first two stay usable.
        assert (await first.call({"type": "heartbeat"}))["type"] == "heartbeat_ack"
        assert (await second.call({"type": "heartbeat"}))["type"] == "heartbeat_ack"
    finally:
        await first.close()
        await second.close()


# --- Tokens ---------------------------------------------------------------------------------------


async def test_a_live_socket_is_closed_with_4401_when_its_token_expires(hub):
    agent = await run(hub.register)
    # 5 s is the least JWT_ACCESS_LIFETIME the settings accept.
    token = await run(issue_token_in_subprocess, hub, agent.agent_id, 5)
    issued = time.monotonic()
    sock = await AgentSocket.connect(hub.ws_url(0), token)
    try:
        assert (await sock.call({"type": "heartbeat"}))["type"] == "heartbeat_ack"
        error = await sock.next_event(timeout=10)
        assert error["type"] == "error" and error["code"] == "not_authenticated"
        assert await sock.wait_closed(timeout=5) == 4401
        assert time.monotonic() - issued < 8
    finally:
        await sock.close()
    assert (await run(hub.http, "GET", "/api/v1/agents/me/", token=token)).status == 401
    again = await AgentSocket.open(hub.ws_url(1), token=token)
    assert await again.wait_closed(timeout=5) == 4401


async def test_revoking_all_tokens_in_the_admin_closes_sockets_on_every_server_within_5s(
    hub, browser
):
    agent = await run(hub.register)
    sockets = [
        await AgentSocket.connect(hub.ws_url(0), agent.access),
        await AgentSocket.connect(hub.ws_url(1), agent.access),
    ]
    try:
        page = await run(browser.agent_action, "revoke_tokens", agent.agent_id)
        revoked = time.monotonic()
        assert "Revoked 2 tokens" in page
        codes = await asyncio.gather(*(s.wait_closed(timeout=5) for s in sockets))
        assert codes == [4401, 4401]
        assert time.monotonic() - revoked < 5
    finally:
        for sock in sockets:
            await sock.close()
    assert (await run(hub.http, "GET", "/api/v1/agents/me/", token=agent.access)).status == 401
    refresh = await run(
        hub.http, "POST", "/api/v1/auth/token/refresh/", body={"refresh": agent.refresh}
    )
    assert refresh.status == 401
    # The operator's action is in the audit log, visible in the admin.
    audit = await run(browser.get, f"/admin/security/auditevent/?q={agent.agent_id}")
    assert "tokens_revoked" in audit and OPERATOR[0] in audit


async def test_rotating_a_secret_in_the_admin_closes_sockets_and_only_the_new_secret_works(
    hub, browser
):
    agent = await run(hub.register)
    sock = await AgentSocket.connect(hub.ws_url(1), agent.access)
    try:
        page = await run(browser.agent_action, "rotate_secret", agent.agent_id)
        new_secret = re.search(r'class="hub-secret">([^<]+)<', page).group(1)
        assert await sock.wait_closed(timeout=5) == 4401
    finally:
        await sock.close()

    def token_for(secret):
        body = {"agent_id": agent.agent_id, "agent_secret": secret}
        return hub.http("POST", "/api/v1/auth/token/", body=body)

    assert (await run(token_for, agent.secret)).status == 401
    fresh = await run(token_for, new_secret)
    assert fresh.status == 200
    async with await AgentSocket.connect(hub.ws_url(0), fresh.body["access"]) as again:
        assert again.welcome["agent_id"] == agent.agent_id


# --- Policies edited in the admin apply to every transport ----------------------------------------


async def test_a_policy_made_in_the_admin_refuses_over_rest_and_websocket_and_is_audited(
    hub, browser
):
    sender, recipient = await run(hub.register), await run(hub.register)
    await run(browser.get, "/admin/security/accesspolicy/add/")
    await run(
        browser.post,
        "/admin/security/accesspolicy/add/",
        {
            "name": "no sends to the vault",
            "enabled": "on",
            "effect": "deny",
            "subject_kind": "all",
            "subject": "",
            "action": "send",
            "target": recipient.agent_id,
            "priority": "0",
        },
    )
    async with (
        await AgentSocket.connect(hub.ws_url(1), sender.access) as sock,
        await AgentSocket.connect(hub.ws_url(0), recipient.access) as vault,
    ):
        # Each server process re-reads policies within its cache window (2 s).
        deadline = time.monotonic() + 5
        while True:
            answer = await sock.call({"type": "send", "to": recipient.agent_id, "payload": {}})
            if answer.get("code") == "forbidden" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert answer["code"] == "forbidden"
        delivered_before = len(vault.messages)
        rest = await run(
            hub.http,
            "POST",
            "/api/v1/messages/",
            server=1,
            token=sender.access,
            body={"to": recipient.agent_id, "payload": {}},
        )
        assert rest.status == 403 and rest.body["code"] == "forbidden"
        await asyncio.sleep(0.3)
        assert len(vault.messages) == delivered_before
    # Refused once over each transport, from the client's address.
    audit = await run(
        browser.get, f"/admin/security/auditevent/?q={sender.agent_id}&outcome__exact=refused"
    )
    assert audit.count("127.0.0.1") == 2
    policy_audit = await run(browser.get, "/admin/security/auditevent/?q=policy_created")
    assert "policy_created" in policy_audit and OPERATOR[0] in policy_audit


# --- Logs -----------------------------------------------------------------------------------------


async def test_no_secret_or_token_appears_in_the_server_logs(hub):
    key = await run(hub.enrollment_key)
    agent = await run(hub.register)
    pair = await run(
        hub.http,
        "POST",
        "/api/v1/auth/token/",
        body={"agent_id": agent.agent_id, "agent_secret": agent.secret},
    )
    refreshed = await run(
        hub.http, "POST", "/api/v1/auth/token/refresh/", body={"refresh": pair.body["refresh"]}
    )
    reused = await run(
        hub.http, "POST", "/api/v1/auth/token/refresh/", body={"refresh": pair.body["refresh"]}
    )
    assert (pair.status, refreshed.status, reused.status) == (200, 200, 401)
    async with await AgentSocket.connect(hub.ws_url(0), pair.body["access"]):
        pass
    async with await open_raw(hub.ws_url(1), origin=ORIGIN) as sock:
        await sock.send_frame({"type": "auth", "token": refreshed.body["access"]})
        assert (await sock.next_event())["type"] == "welcome"
    # A client that puts its token in a query string: refused, and redacted from the access log.
    leaked = refreshed.body["access"]
    in_query = await run(hub.http, "GET", f"/api/v1/agents/?token={leaked}&limit=5")
    assert in_query.status == 401
    await asyncio.sleep(0.5)  # let the servers flush their last lines

    logs = "\n".join(server.log.read_text(errors="replace") for server in hub.servers)
    assert "/api/v1/agents/?token=[redacted]&limit=5" in logs  # the access log is in there
    assert "agent registered" in logs
    raw = {
        "enrollment key": key,
        "agent secret": agent.secret,
        "registration access": agent.access,
        "registration refresh": agent.refresh,
        "access": pair.body["access"],
        "refresh": pair.body["refresh"],
        "refreshed access": refreshed.body["access"],
        "refreshed refresh": refreshed.body["refresh"],
    }
    for name, value in raw.items():
        assert value not in logs, f"the {name} appears in a server log"
    # Nor in any JSON a server wrote about these calls (a last check on the signature parts).
    for value in raw.values():
        if value.count(".") == 2:
            assert value.rsplit(".", 1)[1] not in logs
