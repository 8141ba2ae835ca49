"""Uniform JSON errors for the REST API: a message, a code, and the fields that failed."""

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404, JsonResponse
from django.urls import Resolver404, resolve
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from .services import HubError


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "Request body is too large."
    default_code = "payload_too_large"


def _error_code(detail) -> str:
    codes = getattr(detail, "code", None)
    return codes if isinstance(codes, str) else "error"


def exception_handler(exc, context):
    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge()
    # Django's own refusals become DRF's here, so they get a code like every other error.
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or None)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    if isinstance(exc, OperationalError | InterfaceError):
        # The database is down or locked: nothing was stored, and a retry may well succeed.
        response = Response(
            {"detail": "Storage is unavailable; retry.", "code": "unavailable", "retry_after": 1},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
        response["Retry-After"] = "1"
        return response
    if isinstance(exc, HubError):
        response = Response({"detail": exc.detail, "code": exc.code}, status=exc.status)
        if exc.status == status.HTTP_401_UNAUTHORIZED:
            # RFC 9110: a 401 names the scheme that would be accepted.
            response["WWW-Authenticate"] = 'Bearer realm="api"'
        return response
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        fields = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        names = ", ".join(fields)
        response.data = {"detail": f"Invalid input: {names}.", "code": "invalid", "errors": fields}
    elif isinstance(exc, exceptions.APIException):
        detail = exc.detail
        response.data = {"detail": str(detail), "code": _error_code(detail)}
        if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
            response.data["retry_after"] = int(exc.wait + 0.999)
    return response


def not_found(request, *args, **kwargs):
    """Answer any path under the API that no endpoint matches, in JSON like every other error."""
    detail = f"No API endpoint at {request.path}."
    if not request.path.endswith("/"):
        try:
            match = resolve(request.path + "/")
        except Resolver404:
            match = None
        # Django would redirect (and refuse a POST); an API client just needs the right path.
        if match is not None and match.func is not not_found:
            detail += f" Did you mean {request.path}/ ?"
    return JsonResponse({"detail": detail, "code": "not_found"}, status=404)
