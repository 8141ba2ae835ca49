from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header

from security.services import request_source

from . import services


class HubJWTAuthentication(BaseAuthentication):
    """Bearer JWTs for agents and operators, resolved by the one choke point in services."""

    keyword = b"bearer"

    def authenticate(self, request):
        request_source.set(request.META.get("REMOTE_ADDR", ""))
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword:
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <token>'.")
        try:
            principal = services.principal_from_access_token(parts[1].decode("latin-1"))
        except services.TokenRejected as exc:
            raise exceptions.AuthenticationFailed(exc.detail, code=exc.code) from None
        request.principal = principal
        return (principal.agent or principal.user), principal

    def authenticate_header(self, request):
        return 'Bearer realm="api"'
