"""ASGI entry point: HTTP through Django, WebSockets through Channels (served by daphne)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcp_project.settings")
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from messaging.routing import websocket_urlpatterns  # noqa: E402
from ops import shutdown  # noqa: E402

# Under daphne: on SIGTERM close every agent socket with 1012 before exiting (ops/shutdown.py).
shutdown.install()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Origin and authentication are checked by the consumer itself (see consumers.py).
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
