"""REST throttles for the calls worth abusing: registration, tokens and sends."""

from rest_framework.throttling import SimpleRateThrottle

from .permissions import request_agent


class _AddressThrottle(SimpleRateThrottle):
    methods = ("POST",)

    def get_cache_key(self, request, view):
        if request.method not in self.methods:
            return None
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class RegisterThrottle(_AddressThrottle):
    scope = "register"


class TokenThrottle(_AddressThrottle):
    scope = "token"


class SendThrottle(SimpleRateThrottle):
    """Per agent rather than per address: many agents may share one gateway."""

    scope = "send"

    def get_cache_key(self, request, view):
        agent = request_agent(request)
        if agent is None:
            return None
        return self.cache_format % {"scope": self.scope, "ident": agent.pk}
