"""Request correlation: every HTTP request gets an id, bound to its log lines and echoed back."""

import logging
import re
import time
import uuid

import structlog
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.utils.functional import SimpleLazyObject

from . import telemetry

logger = logging.getLogger("hub.requests")

HEADER = "X-Request-ID"
# A caller's id is kept only if it is short and plain, so it cannot forge log structure.
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
# Probes and scrapes every few seconds would drown the log at INFO.
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")


class RequestIdMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self.__acall__(request)
        started = self._start(request)
        response = self.get_response(request)
        return self._finish(request, response, started)

    async def __acall__(self, request):
        started = self._start(request)
        response = await self.get_response(request)
        return self._finish(request, response, started)

    def _start(self, request) -> float:
        incoming = request.headers.get(HEADER, "")
        request.request_id = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request.request_id)
        return time.monotonic()

    def _finish(self, request, response, started: float):
        response[HEADER] = request.request_id
        status = response.status_code
        fields = {
            "method": request.method,
            "path": request.path,
            "status": status,
            "duration_ms": round((time.monotonic() - started) * 1000, 2),
        }
        # DRF puts the authenticated principal on the underlying request; a lazy user that
        # nothing evaluated is left alone (evaluating it could cost a session query).
        user = request.__dict__.get("user")
        if user is not None and not isinstance(user, SimpleLazyObject):
            if getattr(user, "agent_id", None):
                fields["agent_id"] = user.agent_id
            elif getattr(user, "is_staff", False):
                fields["operator"] = user.get_username()
        if status >= 400:
            data = getattr(response, "data", None)
            code = data.get("code") if isinstance(data, dict) else None
            telemetry.http_error(status=status, code=code)
        quiet = request.path.startswith(QUIET_PATHS) and status < 400
        level = logging.ERROR if status >= 500 else logging.DEBUG if quiet else logging.INFO
        logger.log(level, "request", extra=fields)
        # A thread that serves the next request, or runs anything else, must not inherit this id.
        structlog.contextvars.unbind_contextvars("request_id")
        return response
