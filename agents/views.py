from django.db.models import Prefetch
from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from ops.schema import errors

from . import services
from .models import Agent, Capability
from .permissions import CanReadRegistry, IsAgent, is_operator, operator_may, request_agent
from .serializers import (
    AgentProfileSerializer,
    AgentRegisteredSerializer,
    AgentRegisterSerializer,
    AgentWriteSerializer,
    HeartbeatSerializer,
    TokenObtainSerializer,
    TokenPairSerializer,
    TokenRefreshSerializer,
    profiles_from_values,
)
from .throttles import RegisterThrottle, TokenThrottle


def _query_int(request, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise exceptions.ValidationError({name: ["Must be an integer."]}) from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise exceptions.ValidationError({name: [f"Must be {bounds}."]})
    return value


class DiscoveryPagination(LimitOffsetPagination):
    """Limit/offset pages; a bad limit or offset is a 400 naming it, not silently replaced."""

    default_limit = 50
    max_limit = 500

    def get_limit(self, request):
        return _query_int(request, self.limit_query_param, self.default_limit, 1, self.max_limit)

    def get_offset(self, request):
        return _query_int(request, self.offset_query_param, 0, 0)

    def get_paginated_response(self, data):
        return Response(
            {
                "count": self.count,
                "next": self.get_next_link(),
                "previous": self.get_previous_link(),
                "results": data,
            }
        )


def profiles():
    return (
        Agent.objects.with_open_connection()
        .prefetch_related(Prefetch("capabilities", queryset=Capability.objects.order_by("name")))
        .order_by("agent_id")
    )


class AgentListView(APIView):
    """Register an agent (enrollment key or operator token) or discover agents."""

    throttle_classes = [RegisterThrottle]

    def get_permissions(self):
        if self.request.method == "POST":
            return [AllowAny()]
        return [CanReadRegistry()]

    @extend_schema(
        parameters=[
            OpenApiParameter("capability", str, many=True, description="All must match."),
            OpenApiParameter("status", str, enum=["online", "offline"]),
            OpenApiParameter("search", str),
            OpenApiParameter("limit", int, description="Page size, 1-500 (default 50)."),
            OpenApiParameter("offset", int),
        ],
        operation_id="agents_list",
        responses=inline_serializer(
            "AgentPage",
            {
                "count": serializers.IntegerField(),
                "next": serializers.URLField(allow_null=True),
                "previous": serializers.URLField(allow_null=True),
                "results": AgentProfileSerializer(many=True),
            },
        ),
    )
    def get(self, request):
        for name in ("capability", "search"):
            # PostgreSQL cannot compare text holding NUL: refuse it rather than fail with a 500.
            if any("\x00" in value for value in request.query_params.getlist(name)):
                raise exceptions.ValidationError({name: ["Null characters are not allowed."]})
        queryset = Agent.objects.active().profile_values().order_by("agent_id")
        capabilities = request.query_params.getlist("capability")
        if capabilities:
            queryset = queryset.with_capabilities(capabilities)
        wanted = request.query_params.get("status")
        if wanted == "online":
            queryset = queryset.online()
        elif wanted == "offline":
            queryset = queryset.offline()
        elif wanted:
            raise exceptions.ValidationError({"status": ["Must be 'online' or 'offline'."]})
        text = request.query_params.get("search", "").strip()
        if text:
            queryset = queryset.matching(text)
        paginator = DiscoveryPagination()
        page = paginator.paginate_queryset(queryset, request, view=self)
        return paginator.get_paginated_response(profiles_from_values(page))

    @extend_schema(
        request=AgentRegisterSerializer,
        responses={
            201: AgentRegisteredSerializer,
            **errors({401: "No enrollment key or operator token, or an unknown key."}),
            **errors({403: "Key spent, expired or revoked; or a token that may not register."}),
            **errors({409: "agent_id taken."}),
        },
        parameters=[OpenApiParameter("X-Enrollment-Key", str, OpenApiParameter.HEADER)],
    )
    def post(self, request):
        key = request.headers.get("X-Enrollment-Key")
        by_operator = operator_may(request, "agents.add_agent")
        if key is None and not by_operator:
            if is_operator(request):
                raise exceptions.PermissionDenied("Registering agents needs agents.add_agent.")
            if request.auth is not None:
                raise exceptions.PermissionDenied(
                    "Only operators may register agents with a token."
                )
            raise exceptions.NotAuthenticated("Send X-Enrollment-Key or an operator's token.")
        serializer = AgentRegisterSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        agent, secret = services.agent_register(
            **serializer.validated_data,
            enrollment_key=None if by_operator else key,
            actor=request.user if by_operator else None,
        )
        tokens = services.tokens_issue(agent=agent)
        body = AgentProfileSerializer(profiles().get(pk=agent.pk)).data
        return Response({**body, "agent_secret": secret, **tokens}, status=status.HTTP_201_CREATED)


class AgentDetailView(APIView):
    permission_classes = [CanReadRegistry]

    @extend_schema(responses=AgentProfileSerializer)
    def get(self, request, agent_id):
        if "\x00" in agent_id:  # no agent has one, and PostgreSQL cannot compare it
            raise Http404
        agent = get_object_or_404(profiles().active(), agent_id=agent_id)
        return Response(AgentProfileSerializer(agent).data)


class AgentMeView(APIView):
    permission_classes = [IsAgent]

    def _me(self, request):
        return profiles().get(pk=request_agent(request).pk)

    @extend_schema(responses=AgentProfileSerializer)
    def get(self, request):
        return Response(AgentProfileSerializer(self._me(request)).data)

    @extend_schema(request=AgentWriteSerializer, responses=AgentProfileSerializer)
    def patch(self, request):
        serializer = AgentWriteSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        services.agent_update(agent=request_agent(request), **serializer.validated_data)
        return Response(AgentProfileSerializer(self._me(request)).data)

    @extend_schema(responses={204: None})
    def delete(self, request):
        services.agent_deregister(agent=request_agent(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class HeartbeatView(APIView):
    permission_classes = [IsAgent]

    @extend_schema(request=None, responses=HeartbeatSerializer)
    def post(self, request):
        agent = request_agent(request)
        seen = services.agent_touch(agent=agent)
        return Response({"status": agent.get_status(), "last_seen_at": seen})


class TokenObtainView(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = [TokenThrottle]

    @extend_schema(request=TokenObtainSerializer, responses=TokenPairSerializer)
    def post(self, request):
        serializer = TokenObtainSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if data.get("agent_id"):
            agent = services.agent_authenticate(
                agent_id=data["agent_id"], secret=data["agent_secret"]
            )
            return Response(services.tokens_issue(agent=agent))
        user = services.operator_authenticate(
            request=request, username=data["username"], password=data["password"]
        )
        return Response(services.operator_tokens_issue(user=user))


class TokenRefreshView(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = [TokenThrottle]

    @extend_schema(request=TokenRefreshSerializer, responses=TokenPairSerializer)
    def post(self, request):
        serializer = TokenRefreshSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        return Response(services.tokens_refresh(raw_refresh=serializer.validated_data["refresh"]))
