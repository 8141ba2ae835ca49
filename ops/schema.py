"""OpenAPI generation: the bearer scheme, and the error answers every endpoint can give.

Views declare their success bodies and any error special to them (409, 412, 428 ...); the errors
common to the whole API are added here, so no endpoint's document forgets them.
"""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers
from rest_framework.permissions import AllowAny


class ErrorSerializer(serializers.Serializer):
    """The body of every error answer (agents.api.exception_handler)."""

    detail = serializers.CharField(help_text="What went wrong, for a person.")
    code = serializers.CharField(help_text="What went wrong, for a program.")
    errors = serializers.DictField(
        required=False, help_text="For invalid input: each failing field and its problems."
    )
    retry_after = serializers.IntegerField(
        required=False, help_text="For rate_limited and unavailable: seconds to wait."
    )


COMMON_ERRORS = {
    "400": "Invalid input; `errors` names each failing field.",
    "401": "Missing, malformed, expired or revoked token.",
    "429": "Rate limited; `retry_after` says when to try again.",
}
PERMISSION_ERROR = ("403", "The caller may not do this.")
NOT_FOUND = ("404", "No such object, or not visible to the caller.")
TOO_LARGE = ("413", "The request body or payload is over the configured limit.")


class HubAutoSchema(AutoSchema):
    def _error_statuses(self) -> dict[str, str]:
        statuses = dict(COMMON_ERRORS)
        permissions = self.view.get_permissions() if hasattr(self.view, "get_permissions") else []
        if not all(isinstance(permission, AllowAny) for permission in permissions):
            statuses.setdefault(*PERMISSION_ERROR)
        if "{" in self.path:
            statuses.setdefault(*NOT_FOUND)
        if self.method in ("POST", "PUT", "PATCH"):
            statuses.setdefault(*TOO_LARGE)
        return statuses

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        error = self.resolve_serializer(ErrorSerializer, "response").ref
        for status, description in self._error_statuses().items():
            responses.setdefault(
                status,
                {"content": {"application/json": {"schema": error}}, "description": description},
            )
        return responses


class HubJWTScheme(OpenApiAuthenticationExtension):
    target_class = "agents.authentication.HubJWTAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An agent's or operator's access token from POST /api/v1/auth/token/.",
        }


def errors(descriptions: dict[int, str]) -> dict:
    """Describe errors special to one endpoint: `extend_schema(responses={..., **errors({})})`."""
    return {
        status: OpenApiResponse(ErrorSerializer, description=description)
        for status, description in descriptions.items()
    }
