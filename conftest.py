"""The shared cast of the test suite: agents alice, bob and carol, and an operator."""

from dataclasses import dataclass

import pytest
from rest_framework.test import APIClient

from agents import services
from agents.models import Agent


@dataclass
class Credentials:
    agent: Agent
    secret: str
    access: str
    refresh: str

    @property
    def agent_id(self) -> str:
        return self.agent.agent_id

    @property
    def auth_header(self) -> dict:
        return {"HTTP_AUTHORIZATION": f"Bearer {self.access}"}

    @property
    def ws_headers(self) -> list:
        return [(b"authorization", f"Bearer {self.access}".encode())]


@pytest.fixture(autouse=True)
def message_writers_stopped():
    """End the test's message writer thread with the test: it holds a database connection and,
    on SQLite, checkpoints the database file beside the next test's writer. The agents the
    writer remembers go with it: the next test's agents are new rows."""
    from messaging.batch import _statements
    from messaging.engine import stop_writers

    yield
    stop_writers()
    _statements.cache_clear()


@pytest.fixture(autouse=True)
def fresh_throttles():
    """Start every test with empty throttle counters (they live in the default cache)."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Hash operator passwords cheaply: PBKDF2's deliberate cost is ~0.5 s per user created."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def loop_lookups(monkeypatch) -> list:
    """One entry per call of asyncio.get_running_loop() (a getpid system call in Python 3.11)."""
    import asyncio

    asked = []
    get_running_loop = asyncio.get_running_loop

    def counted():
        asked.append(1)
        return get_running_loop()

    monkeypatch.setattr(asyncio, "get_running_loop", counted)
    return asked


@pytest.fixture
def make_agent(db):
    def make(agent_id: str, capabilities=(), **fields) -> Credentials:
        agent, secret = services.agent_register(
            agent_id=agent_id,
            capabilities=[{"name": name} for name in capabilities],
            **fields,
        )
        tokens = services.tokens_issue(agent=agent)
        return Credentials(agent=agent, secret=secret, **tokens)

    return make


@pytest.fixture
def alice(make_agent) -> Credentials:
    return make_agent("alice", capabilities=["ocr", "summarize"], name="Alice")


@pytest.fixture
def bob(make_agent) -> Credentials:
    return make_agent("bob", capabilities=["credit-score"], name="Bob")


@pytest.fixture
def carol(make_agent) -> Credentials:
    return make_agent("carol", capabilities=["ocr"], name="Carol")


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_superuser("operator", "op@example.com", "op-password-1")


@pytest.fixture
def operator_tokens(operator) -> dict:
    return services.operator_tokens_issue(user=operator)


@pytest.fixture
def enrollment_key(db) -> str:
    _, raw = services.enrollment_key_create(label="tests", max_uses=100)
    return raw


@pytest.fixture
def api():
    return APIClient()


@pytest.fixture
def as_agent():
    """Return an API client authenticated as the given agent's credentials."""

    def client(credentials: Credentials) -> APIClient:
        c = APIClient()
        c.credentials(**credentials.auth_header)
        return c

    return client
