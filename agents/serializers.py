from django.core.validators import RegexValidator
from django.utils import timezone
from rest_framework import serializers

from .models import AGENT_ID_PATTERN, Agent, Capability, liveness_cutoff

CAPABILITY_NAME = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}$",
    "Capability names are 1-100 characters of letters, digits, '.', '_', ':', '/' or '-'.",
)
MAX_CAPABILITIES = 100


class CapabilitySerializer(serializers.ModelSerializer):
    name = serializers.CharField(max_length=100, validators=[CAPABILITY_NAME])
    version = serializers.CharField(max_length=50, required=False, allow_blank=True, default="")
    description = serializers.CharField(
        max_length=2000, required=False, allow_blank=True, default=""
    )

    class Meta:
        model = Capability
        fields = ["name", "version", "description"]

    def validate(self, attrs):
        # A PATCH makes the whole serializer tree partial, which would let a capability without
        # a name through; the list is always replaced whole, so each item needs its name.
        if "name" not in attrs:
            raise serializers.ValidationError({"name": ["This field is required."]})
        return attrs


def validate_capability_list(value):
    if len(value) > MAX_CAPABILITIES:
        raise serializers.ValidationError(f"At most {MAX_CAPABILITIES} capabilities.")
    names = [cap["name"] for cap in value]
    if len(names) != len(set(names)):
        raise serializers.ValidationError("Capability names must be unique.")
    return value


class AgentProfileSerializer(serializers.ModelSerializer):
    capabilities = CapabilitySerializer(many=True, read_only=True)
    status = serializers.SerializerMethodField()

    class Meta:
        model = Agent
        fields = [
            "agent_id",
            "name",
            "description",
            "capabilities",
            "metadata",
            "status",
            "state",
            "last_seen_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def get_status(self, agent) -> str:
        return agent.get_status()


def _iso_datetime(value, tz):
    """Format as DRF's DateTimeField does: ISO 8601 in the current time zone, UTC as 'Z'."""
    if value is None:
        return None
    text = value.astimezone(tz).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def profiles_from_values(rows: list[dict]) -> list[dict]:
    """Render Agent.objects.profile_values() rows exactly as AgentProfileSerializer renders agents.

    Discovery pages hold up to 500 profiles: building them from dicts, with the capabilities of
    the whole page read in one query, costs a fraction of model instances, a prefetch and a
    nested ModelSerializer per agent. test_discovery holds the two renderings equal.
    """
    capabilities = {row["pk"]: [] for row in rows}
    if capabilities:
        for agent_pk, name, version, description in (
            Capability.objects.filter(agent__in=list(capabilities))
            .order_by("name")
            .values_list("agent_id", "name", "version", "description")
        ):
            capabilities[agent_pk].append(
                {"name": name, "version": version, "description": description}
            )
    cutoff = liveness_cutoff()
    tz = timezone.get_current_timezone()
    return [
        {
            "agent_id": row["agent_id"],
            "name": row["name"],
            "description": row["description"],
            "capabilities": capabilities[row["pk"]],
            "metadata": row["metadata"],
            "status": Agent.status_from(
                has_open_connection=row["has_open_connection"],
                last_seen_at=row["last_seen_at"],
                cutoff=cutoff,
            ),
            "state": row["state"],
            "last_seen_at": _iso_datetime(row["last_seen_at"], tz),
            "created_at": _iso_datetime(row["created_at"], tz),
            "updated_at": _iso_datetime(row["updated_at"], tz),
        }
        for row in rows
    ]


class AgentWriteSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True)
    description = serializers.CharField(max_length=5000, required=False, allow_blank=True)
    capabilities = CapabilitySerializer(many=True, required=False)
    metadata = serializers.DictField(required=False)

    def validate_capabilities(self, value):
        return validate_capability_list(value)


class AgentRegisterSerializer(AgentWriteSerializer):
    agent_id = serializers.RegexField(
        AGENT_ID_PATTERN,
        max_length=64,
        # No braces in this message: DRF formats it with str.format when the value is not a string.
        error_messages={
            "invalid": "agent_id must be 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit."
        },
    )
    capabilities = CapabilitySerializer(many=True, required=False, default=list)


class AgentRegisteredSerializer(AgentProfileSerializer):
    """The registration answer: the profile plus the secret and tokens, shown once."""

    agent_secret = serializers.CharField()
    access = serializers.CharField()
    refresh = serializers.CharField()

    class Meta(AgentProfileSerializer.Meta):
        fields = [*AgentProfileSerializer.Meta.fields, "agent_secret", "access", "refresh"]


class TokenObtainSerializer(serializers.Serializer):
    """Agents send agent_id/agent_secret; operators may send username/password instead."""

    agent_id = serializers.CharField(required=False, max_length=64)
    agent_secret = serializers.CharField(required=False, max_length=200, trim_whitespace=False)
    username = serializers.CharField(required=False, max_length=150)
    password = serializers.CharField(required=False, max_length=200, trim_whitespace=False)

    def validate(self, attrs):
        pairs = (("agent_id", "agent_secret"), ("username", "password"))
        for first, second in pairs:
            if attrs.get(first) or attrs.get(second):
                # Half a pair: name the half that is missing.
                missing = [name for name in (first, second) if not attrs.get(name)]
                if missing:
                    raise serializers.ValidationError(
                        {name: ["This field is required."] for name in missing}
                    )
                return attrs
        raise serializers.ValidationError(
            {name: ["This field is required."] for name in ("agent_id", "agent_secret")}
        )


class TokenPairSerializer(serializers.Serializer):
    access = serializers.CharField()
    refresh = serializers.CharField()


class TokenRefreshSerializer(serializers.Serializer):
    refresh = serializers.CharField()


class HeartbeatSerializer(serializers.Serializer):
    status = serializers.CharField()
    last_seen_at = serializers.DateTimeField()
