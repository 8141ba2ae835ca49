from django.contrib import admin
from django.shortcuts import render
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from agents.api import not_found as api_not_found
from ops import views as ops_views

from . import health

api = [
    path("", include("agents.urls")),
    path("", include("messaging.urls")),
    path("", include("contexts.urls")),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    # Last: any other path under the API answers a JSON 404 rather than an HTML page.
    re_path(r"^", api_not_found),
]


def home(request):
    scheme = "wss" if request.is_secure() else "ws"
    return render(request, "home.html", {"ws_url": f"{scheme}://{request.get_host()}/ws/agent/"})


urlpatterns = [
    path("", home, name="home"),
    path("api/v1/", include(api)),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", ops_views.metrics, name="metrics"),
    # Before admin.site.urls, whose catch-all would otherwise answer these paths.
    path("admin/ops/", include("ops.urls")),
    path("admin/", admin.site.urls),
]
