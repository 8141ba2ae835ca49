from django.contrib import admin
from django.shortcuts import render
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from . import health

api = [
    path("", include("agents.urls")),
    path("", include("messaging.urls")),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
]



def home(request):
    scheme = "wss" if request.is_secure() else "ws"
    return render(request, "home.html", {"ws_url": f"{scheme}://{request.get_host()}/ws/agent/"})


urlpatterns = [
    path("", home, name="home"),
    path("api/v1/", include(api)),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
]
