"""ops/routing.py: Channels' routing, with the consumer's coroutine as the only one per socket."""

import pytest
from channels.routing import URLRouter as ChannelsURLRouter
from django.urls import path, re_path
from django.urls.exceptions import Resolver404

from messaging.consumers import AgentConsumer
from messaging.routing import websocket_urlpatterns
from ops.routing import ProtocolTypeRouter, URLRouter

from .conftest import last_line_of


async def http_app(scope, receive, send):
    return "http"


def websocket_scope(path: str, **extra) -> dict:
    return {"type": "websocket", "path": path, "headers": [], **extra}


def routed(application, scope):
    """Call an application as daphne does; return its coroutine's code and its first local."""
    coroutine = application(scope=scope, receive=None, send=None)
    try:
        code = coroutine.cr_code
        return code, coroutine.cr_frame.f_locals
    finally:
        coroutine.close()


def test_a_socket_runs_as_the_consumers_own_coroutine():
    application = ProtocolTypeRouter(
        {"http": http_app, "websocket": URLRouter(websocket_urlpatterns)}
    )
    code, local = routed(application, websocket_scope("/ws/agent/"))
    assert code is AgentConsumer.__call__.__code__
    assert isinstance(local["self"], AgentConsumer)
    assert local["scope"]["url_route"] == {"args": (), "kwargs": {}}
    assert local["scope"]["path_remaining"] == ""
    assert local["scope"]["path"] == "/ws/agent/"


def test_route_arguments_reach_the_scope_as_channels_puts_them():
    router = URLRouter([re_path(r"^ws/(?P<room>\w+)/$", AgentConsumer.as_asgi())])
    _code, local = routed(router, websocket_scope("/ws/lobby/"))
    assert local["scope"]["url_route"] == {"args": (), "kwargs": {"room": "lobby"}}


class Greeter(AgentConsumer):
    def __init__(self, *args, greeting=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.greeting = greeting


def test_initkwargs_of_as_asgi_reach_the_consumer():
    router = URLRouter([path("ws/agent/", Greeter.as_asgi(greeting="hello"))])
    _code, local = routed(router, websocket_scope("/ws/agent/"))
    assert local["self"].greeting == "hello"


async def test_an_unknown_path_fails_as_channels_fails_it():
    application = ProtocolTypeRouter({"websocket": URLRouter(websocket_urlpatterns)})
    coroutine = application(websocket_scope("/ws/nowhere/"), None, None)
    # Raised when run, as by Channels' router: daphne answers the handshake with a 500.
    with pytest.raises(ValueError, match="No route found for path 'ws/nowhere/'"):
        await coroutine


async def test_a_path_outside_the_root_path_fails_as_channels_fails_it():
    router = URLRouter(websocket_urlpatterns)
    with pytest.raises(ValueError, match="No route found"):
        await router(websocket_scope("/elsewhere/ws/agent/", root_path="/hub"), None, None)


async def test_a_scope_type_without_an_application_fails_as_channels_fails_it():
    application = ProtocolTypeRouter({"http": http_app})
    with pytest.raises(ValueError, match="No application configured for scope type 'lifespan'"):
        await application({"type": "lifespan"}, None, None)


async def test_http_goes_to_its_application():
    application = ProtocolTypeRouter({"http": http_app})
    assert await application({"type": "http", "path": "/"}, None, None) == "http"


async def test_a_nested_router_routes_through_channels():
    inner = ChannelsURLRouter([path("agent/", AgentConsumer.as_asgi())])
    router = URLRouter([path("ws/", inner)])
    with pytest.raises(Resolver404):
        await router(websocket_scope("/ws/nowhere/", path_remaining="ws/nowhere/"), None, None)
    coroutine = router(websocket_scope("/ws/agent/"), None, None)
    assert coroutine.cr_code is ChannelsURLRouter.__call__.__code__
    coroutine.close()


def test_asgiref_takes_them_for_single_callables():
    from asgiref.compatibility import guarantee_single_callable

    application = ProtocolTypeRouter({"websocket": URLRouter(websocket_urlpatterns)})
    assert guarantee_single_callable(application) is application


PROBE = """
import mcp_project.asgi
coroutine = mcp_project.asgi.application(
    {"type": "websocket", "path": "/ws/agent/", "headers": []}, None, None
)
print(coroutine.cr_code.co_qualname)
coroutine.close()
"""


def test_the_servers_application_routes_sockets_flat():
    # A process of its own: loading the application tunes the garbage collector.
    assert last_line_of(PROBE) == "AgentConsumer.__call__"
