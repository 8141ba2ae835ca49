"""Django's ASGI handler for HTTP, with its synchronous work on a pool of long-lived threads.

Django runs each ASGI request's synchronous parts (the middleware, the view, the ORM) in a
thread of the request's own, made for it and joined when it ends. The database connection
belongs to that thread, so every request opened a connection and closed it again: on SQLite
that is a file opened and six PRAGMAs run, on PostgreSQL a new server backend. Discovery over
10,000 agents (bench rest, SQLite) spent about 19 ms of CPU per request, most of it there.

Here a request borrows one of `threads` single-thread executors for its whole life (asgiref's
ThreadSensitiveContext with an executor of the caller's), so its synchronous calls still run on
one thread, one request at a time on it, and the thread keeps its database connection between
requests for CONN_MAX_AGE, as a WSGI worker thread would. A request that finds every thread busy
waits for the first one free.

The whole middleware chain runs there too, with the view, as one synchronous call. Django keeps
async-capable middleware on the event loop under ASGI, and one synchronous middleware among them
(WhiteNoise's) made every request go from the loop to a thread for the outer middleware, back to
the loop for the inner ones, and to the thread again for the view. Discovery over 10,000 agents
(bench rest, PostgreSQL, hub only, two runs each): 80-84 -> 128 requests/s, p50 96-100 -> 62 ms,
p99 127-139 -> 86 ms. It also keeps the middleware's work off the loop that serves the sockets.
"""

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.db import connections


class ThreadPool:
    """Single-thread executors lent to one request at a time, in the order requests asked."""

    def __init__(self, threads: int):
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._idle: deque[ThreadPoolExecutor] = deque(
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"http-{index}")
            for index in range(threads)
        )
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self) -> ThreadPoolExecutor:
        if self._idle and not self._waiters:
            return self._idle.popleft()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Handed an executor in the same instant the request was cancelled.
                self.release(waiter.result())
            else:
                self._waiters.remove(waiter)
            raise

    def release(self, executor: ThreadPoolExecutor) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(executor)
                return
        self._idle.append(executor)

    def shutdown(self) -> None:
        """End the idle threads, closing the database connections they hold."""
        while self._idle:
            executor = self._idle.popleft()
            executor.submit(connections.close_all).result()
            executor.shutdown()


class PooledASGIHandler(ASGIHandler):
    """ASGIHandler whose requests run their synchronous parts on a ThreadPool's threads."""

    def __init__(self, threads: int):
        super().__init__()
        self.threads = ThreadPool(threads)

    def load_middleware(self, is_async=False):
        """The whole middleware chain and the view as one synchronous call on the request's
        thread (see above); Django's own handler asks for an asynchronous chain."""
        super().load_middleware(is_async=False)
        self._middleware_chain = sync_to_async(self._middleware_chain, thread_sensitive=True)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            # Django's own refusal of anything but HTTP.
            return await super().__call__(scope, receive, send)
        executor = await self.threads.acquire()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            self.threads.release(executor)


def get_asgi_application() -> PooledASGIHandler:
    """django.core.asgi.get_asgi_application, with HUB["HTTP_THREADS"] request threads."""
    import django
    from django.conf import settings

    django.setup(set_prefix=False)
    return PooledASGIHandler(settings.HUB["HTTP_THREADS"])
