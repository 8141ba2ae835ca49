from django.urls import path

from . import views

# context_id is matched as text and parsed in the view, so a malformed id answers a JSON 404.
urlpatterns = [
    path("contexts/", views.ContextListView.as_view(), name="context-list"),
    path("contexts/<str:context_id>/", views.ContextDetailView.as_view(), name="context-detail"),
    path(
        "contexts/<str:context_id>/versions/",
        views.ContextVersionsView.as_view(),
        name="context-versions",
    ),
    path(
        "contexts/<str:context_id>/versions/<int:version>/",
        views.ContextVersionDetailView.as_view(),
        name="context-version",
    ),
]
