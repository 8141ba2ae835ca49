from django.urls import path

from . import views

urlpatterns = [
    path("agents/", views.AgentListView.as_view(), name="agent-list"),
    # "me" is a reserved agent_id, so this route never shadows a real agent.
    path("agents/me/", views.AgentMeView.as_view(), name="agent-me"),
    path("agents/me/heartbeat/", views.HeartbeatView.as_view(), name="agent-heartbeat"),
    path("agents/<str:agent_id>/", views.AgentDetailView.as_view(), name="agent-detail"),
    path("auth/token/", views.TokenObtainView.as_view(), name="token-obtain"),
    path("auth/token/refresh/", views.TokenRefreshView.as_view(), name="token-refresh"),
]
