import orjson
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from agents.api import PayloadTooLarge
from agents.permissions import IsAgent, request_agent
from agents.throttles import SendThrottle
from ops.schema import errors

from . import services
from .models import Message
from .serializers import (
    AcceptedSerializer,
    AckSerializer,
    InboxQuerySerializer,
    MessageDetailSerializer,
    SendSerializer,
    max_payload_bytes,
)


class MessageSendView(APIView):
    permission_classes = [IsAgent]
    throttle_classes = [SendThrottle]

    @extend_schema(
        request=SendSerializer,
        responses={201: AcceptedSerializer, **errors({404: "No such recipient."})},
    )
    def post(self, request):
        serializer = SendSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if len(orjson.dumps(data["payload"])) > max_payload_bytes():
            raise PayloadTooLarge(f"payload is larger than {max_payload_bytes()} bytes")
        if data.get("to"):
            route = {"kind": Message.Kind.DIRECT, "to": data["to"]}
        elif data.get("topic"):
            route = {"kind": Message.Kind.TOPIC, "topic": data["topic"]}
        else:
            route = {"kind": Message.Kind.BROADCAST}
        accepted = services.message_send(
            sender=request_agent(request),
            payload=data["payload"],
            client_id=data.get("id"),
            ttl=data.get("ttl"),
            **route,
        )
        return Response(accepted.as_dict(), status=status.HTTP_201_CREATED)


class InboxView(APIView):
    permission_classes = [IsAgent]

    @extend_schema(
        parameters=[InboxQuerySerializer],
        responses=inline_serializer("Inbox", {"results": serializers.ListField()}),
    )
    def get(self, request):
        query = InboxQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        frames = services.pending_frames(recipient=request_agent(request), **query.validated_data)
        return Response({"results": frames})


class AckView(APIView):
    permission_classes = [IsAgent]

    @extend_schema(
        request=AckSerializer,
        responses=inline_serializer("Acked", {"acked": serializers.IntegerField()}),
    )
    def post(self, request):
        serializer = AckSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        acked = services.deliveries_ack(
            recipient=request_agent(request), **serializer.validated_data
        )
        return Response({"acked": acked})


class MessageDetailView(APIView):
    permission_classes = [IsAgent]

    @extend_schema(responses=MessageDetailSerializer)
    def get(self, request, message_id):
        agent = request_agent(request)
        message = services.message_for(agent=agent, message_id=message_id)
        return Response(MessageDetailSerializer(message, context={"agent": agent}).data)
