"""ASGI entry point: HTTP through Django, WebSockets through Channels (served by daphne)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcp_project.settings")

from ops.http_threads import get_asgi_application

# Django must be set up before anything imports models. Requests run on a pool of threads that
# keep their database connections (ops/http_threads.py).
django_asgi_app = get_asgi_application()

from agents.checks import refuse_unsafe_production  # noqa: E402

# Servers run no system checks of their own: in production, unsafe settings stop the start here.
refuse_unsafe_production()

from messaging.routing import websocket_urlpatterns  # noqa: E402
from ops import collector, lean_server, shutdown  # noqa: E402
from ops.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from security import server as server_hardening  # noqa: E402

# Under daphne: on SIGTERM close every agent socket with 1012 before exiting (ops/shutdown.py).
shutdown.install()
# Under daphne: oversized frames close with 1009, and no credential in a query string reaches the
# access log (security/server.py).
server_hardening.install()
# Under daphne: less memory per socket (the application's input queue, autobahn's copies of its
# options, what the handshake leaves behind) and less work per frame (ops/lean_server.py).
lean_server.install()

# Routed without a suspended coroutine per routing level (ops/routing.py).
application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Origin and authentication are checked by the consumer itself (see consumers.py).
        "websocket": URLRouter(websocket_urlpatterns),
    }
)

# Last, once everything the process keeps for its lifetime exists: a full garbage collection
# then walks only what serving has made (ops/collector.py).
collector.tune_for_serving()
