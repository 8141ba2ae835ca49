"""Name the client address of every HTTP request, so audit records made while serving it carry it.

REST views, admin actions and anything they call reach `security.services.audit_record`, which
reads `request_source`; the WebSocket consumer sets the same variable for its socket. Behind a TLS
proxy, daphne's --proxy-headers makes REMOTE_ADDR the client's address rather than the proxy's.
"""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from .services import request_source


class RequestSourceMiddleware:
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
        token = request_source.set(request.META.get("REMOTE_ADDR") or "")
        try:
            return self.get_response(request)
        finally:
            # A thread that serves the next request must not inherit this address.
            request_source.reset(token)

    async def __acall__(self, request):
        token = request_source.set(request.META.get("REMOTE_ADDR") or "")
        try:
            return await self.get_response(request)
        finally:
            request_source.reset(token)
