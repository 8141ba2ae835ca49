from rest_framework.permissions import BasePermission

from .models import Agent


def request_agent(request) -> Agent | None:
    user = getattr(request, "user", None)
    return user if isinstance(user, Agent) else None


def is_operator(request) -> bool:
    user = getattr(request, "user", None)
    return bool(user is not None and not isinstance(user, Agent) and user.is_staff)


class IsAgent(BasePermission):
    message = "This call is for agents."

    def has_permission(self, request, view):
        return request_agent(request) is not None


class IsAgentOrOperator(BasePermission):
    message = "This call is for agents and operators."

    def has_permission(self, request, view):
        return request_agent(request) is not None or is_operator(request)


def operator_may(request, perm: str) -> bool:
    """Operators use the REST API under the same Django model permissions as in the admin."""
    return is_operator(request) and request.user.has_perm(perm)


class CanReadRegistry(BasePermission):
    """Agents discover each other; operators need the agents.view_agent permission."""

    message = "This call is for agents and operators with permission to view agents."

    def has_permission(self, request, view):
        return request_agent(request) is not None or operator_may(request, "agents.view_agent")
