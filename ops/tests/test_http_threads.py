"""ops.http_threads: HTTP requests on a pool of threads that keep their database connections."""

import asyncio
import threading

import pytest
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from asgiref.testing import ApplicationCommunicator
from django.db import connections
from django.db.backends.signals import connection_created

from ops.http_threads import PooledASGIHandler, ThreadPool


async def get(application, path: str, headers=()) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
    start = await communicator.receive_output(timeout=10)
    body = b""
    while True:
        message = await communicator.receive_output(timeout=10)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await communicator.wait(timeout=10)
    return start["status"], body


@pytest.fixture
def opened_connections():
    """The names of the threads that opened a database connection, one per connection."""
    threads = []

    def opened(sender, connection, **kwargs):
        threads.append(threading.current_thread().name)

    connection_created.connect(opened)
    yield threads
    connection_created.disconnect(opened)


@pytest.fixture
def handler():
    application = PooledASGIHandler(threads=2)
    yield application
    application.threads.shutdown()


@pytest.mark.django_db(transaction=True)
async def test_requests_reuse_their_threads_database_connections(
    handler, alice, opened_connections, monkeypatch
):
    # As the servers run (the test runner sets 0: connections close after each request).
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 600)
    headers = [(b"authorization", f"Bearer {alice.access}".encode())]
    for _ in range(5):
        status, body = await get(handler, "/api/v1/agents/", headers)
        assert status == 200, body
    # Django's own handler opens one per request (a thread each); here one per pool thread.
    # Other threads of the process (a message writer, say) are not the requests'.
    requests_opened = [name for name in opened_connections if name.startswith("http-")]
    assert 1 <= len(requests_opened) <= 2
    assert handler.threads.idle == 2


async def test_a_request_waits_for_a_free_thread_and_threads_go_in_turn():
    pool = ThreadPool(1)
    first = await pool.acquire()
    second = asyncio.ensure_future(pool.acquire())
    third = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    assert not second.done() and not third.done()
    pool.release(first)
    assert await second is first
    assert not third.done()
    pool.release(first)
    assert await third is first
    pool.release(first)
    assert pool.idle == 1
    pool.shutdown()
    assert pool.idle == 0


async def test_a_request_cancelled_while_waiting_loses_no_thread():
    pool = ThreadPool(1)
    executor = await pool.acquire()
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    pool.release(executor)
    assert pool.idle == 1
    # Handed the thread in the same instant it is cancelled: the thread goes back.
    executor = await pool.acquire()
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    pool.release(executor)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool.idle == 1
    pool.shutdown()


async def test_each_request_runs_its_synchronous_work_on_one_pool_thread(handler, settings):
    status, _ = await get(handler, "/healthz")
    assert status == 200
    names = {thread.name for thread in threading.enumerate()}
    assert any(name.startswith("http-") for name in names)


class ThreadProbe:
    """Records the thread each request passes it on; async-capable, as most middleware is (in an
    async chain it hands on the coroutine of the middleware after it)."""

    sync_capable = True
    async_capable = True
    seen: list[str] = []

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        self.seen.append(threading.current_thread().name)
        return self.get_response(request)


async def test_the_middleware_and_the_view_run_together_on_the_requests_thread(settings):
    # Django keeps async-capable middleware on the event loop when the handler is async; a
    # synchronous one among them (WhiteNoise) sent every request from the loop to a thread, back
    # to the loop, and to the thread again for the view.
    probe = f"{ThreadProbe.__module__}.{ThreadProbe.__qualname__}"
    settings.MIDDLEWARE = [probe, *settings.MIDDLEWARE, probe]
    ThreadProbe.seen = []
    application = PooledASGIHandler(threads=1)
    try:
        status, _ = await get(application, "/healthz")
    finally:
        application.threads.shutdown()
    assert status == 200
    assert len(ThreadProbe.seen) == 2
    assert all(name.startswith("http-0") for name in ThreadProbe.seen), ThreadProbe.seen


def test_it_refuses_a_pool_without_threads():
    with pytest.raises(ValueError):
        ThreadPool(0)
