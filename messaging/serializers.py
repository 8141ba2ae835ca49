from django.conf import settings
from django.utils import timezone
from rest_framework import serializers

from . import protocol
from .models import Delivery, Message


class SendSerializer(serializers.Serializer):
    to = serializers.RegexField(protocol.AGENT_ID_RE.pattern, required=False, max_length=64)
    topic = serializers.RegexField(protocol.TOPIC_RE.pattern, required=False, max_length=100)
    broadcast = serializers.BooleanField(required=False, default=False)
    # Any JSON value is a payload, null included (the WebSocket accepts it too).
    payload = serializers.JSONField(allow_null=True)
    id = serializers.CharField(required=False, max_length=protocol.MAX_CLIENT_ID)
    ttl = serializers.IntegerField(required=False, min_value=1, max_value=protocol.MAX_TTL)

    def validate(self, attrs):
        chosen = [name for name in ("to", "topic") if attrs.get(name)] + (
            ["broadcast"] if attrs.get("broadcast") else []
        )
        if len(chosen) != 1:
            raise serializers.ValidationError(
                {"to": ["Send exactly one of 'to', 'topic' and 'broadcast': true."]}
            )
        return attrs


class AcceptedSerializer(serializers.Serializer):
    message_id = serializers.UUIDField()
    status = serializers.ChoiceField(["delivered", "queued"])
    recipients = serializers.IntegerField()
    duplicate = serializers.BooleanField()


class InboxQuerySerializer(serializers.Serializer):
    after_seq = serializers.IntegerField(required=False, min_value=0, default=0)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, default=100)


class AckSerializer(serializers.Serializer):
    message_ids = serializers.ListField(
        child=serializers.UUIDField(), required=False, max_length=protocol.MAX_ACK_IDS
    )
    up_to_seq = serializers.IntegerField(required=False, min_value=0)

    def validate(self, attrs):
        if ("message_ids" in attrs) == ("up_to_seq" in attrs):
            raise serializers.ValidationError(
                {"message_ids": ["Send exactly one of 'message_ids' and 'up_to_seq'."]}
            )
        return attrs


class DeliveryStateSerializer(serializers.ModelSerializer):
    recipient = serializers.CharField(source="recipient.agent_id")
    status = serializers.SerializerMethodField()

    class Meta:
        model = Delivery
        fields = ["recipient", "seq", "status", "attempts", "delivered_at", "acked_at"]

    def get_status(self, delivery) -> str:
        # The expiry sweep runs periodically; a pending row past its deadline is already expired
        # (it is never sent again), so say so instead of showing a stale "queued".
        expired = delivery.expires_at is not None and delivery.expires_at <= timezone.now()
        if delivery.status in Delivery.PENDING and expired:
            return Delivery.Status.EXPIRED
        return delivery.status


class MessageDetailSerializer(serializers.ModelSerializer):
    message_id = serializers.UUIDField(source="id")
    sender = serializers.CharField(source="sender.agent_id")
    sent_at = serializers.DateTimeField(source="created_at")
    deliveries = serializers.SerializerMethodField()

    class Meta:
        model = Message
        fields = [
            "message_id",
            "kind",
            "sender",
            "topic",
            "payload",
            "client_id",
            "in_reply_to",
            "recipient_count",
            "sent_at",
            "expires_at",
            "deliveries",
        ]

    def get_deliveries(self, message) -> list[dict]:
        viewer = self.context["agent"]
        rows = message.deliveries.all()
        if message.sender_id != viewer.pk:
            # A recipient sees its own delivery, not who else got the message.
            rows = [row for row in rows if row.recipient_id == viewer.pk]
        return DeliveryStateSerializer(rows, many=True).data


def max_payload_bytes() -> int:
    return settings.HUB["MAX_PAYLOAD_BYTES"]
