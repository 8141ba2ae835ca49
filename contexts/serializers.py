from rest_framework import serializers

from messaging.protocol import AGENT_ID_RE

from . import services
from .protocol import CONTEXT_TYPES, KEY_RE, MAX_TAGS, TAG_RE, pattern_text

TAG_HELP = f"1-64 characters matching {pattern_text(TAG_RE)}; at most {MAX_TAGS}."
KEY_HELP = f"The owner's own name for the entry, unique per owner; matches {pattern_text(KEY_RE)}."


def _tags(**kwargs) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.RegexField(TAG_RE.pattern, max_length=64),
        max_length=MAX_TAGS,
        help_text=TAG_HELP,
        **kwargs,
    )


class _TTLMixin:
    def validate_ttl_seconds(self, value):
        problem = services.ttl_problem(value)
        if problem:
            raise serializers.ValidationError(problem)
        return value


class ContextEntrySerializer(serializers.Serializer):
    """An entry as REST and the change stream show it (ContextEntry.as_dict builds it)."""

    context_id = serializers.UUIDField()
    agent_id = serializers.CharField(help_text="The owner: the agent that created the entry.")
    context_type = serializers.ChoiceField(CONTEXT_TYPES)
    key = serializers.CharField(allow_null=True)
    payload = serializers.JSONField()
    tags = serializers.ListField(child=serializers.CharField())
    version = serializers.IntegerField()
    ttl_seconds = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)


class ContextCreateSerializer(_TTLMixin, serializers.Serializer):
    context_type = serializers.ChoiceField(CONTEXT_TYPES)
    payload = serializers.JSONField()
    tags = _tags(required=False, default=list)
    ttl_seconds = serializers.IntegerField(
        required=False,
        allow_null=True,
        help_text="Seconds until expiry, counted from each write; null: the operator's maximum.",
    )
    key = serializers.RegexField(
        KEY_RE.pattern, max_length=200, required=False, allow_null=True, help_text=KEY_HELP
    )


class ContextReplaceSerializer(_TTLMixin, serializers.Serializer):
    """PUT: payload, tags and ttl_seconds replaced; context_type and key may only be repeated."""

    payload = serializers.JSONField()
    tags = _tags(required=False, default=list)
    ttl_seconds = serializers.IntegerField(required=False, allow_null=True)
    context_type = serializers.ChoiceField(CONTEXT_TYPES, required=False)
    key = serializers.RegexField(KEY_RE.pattern, max_length=200, required=False, allow_null=True)


class ContextPatchSerializer(_TTLMixin, serializers.Serializer):
    """PATCH: only the fields given change."""

    payload = serializers.JSONField(required=False)
    tags = _tags(required=False)
    ttl_seconds = serializers.IntegerField(required=False, allow_null=True)
    context_type = serializers.ChoiceField(CONTEXT_TYPES, required=False)
    key = serializers.RegexField(KEY_RE.pattern, max_length=200, required=False, allow_null=True)

    def validate(self, attrs):
        if not {"payload", "tags", "ttl_seconds"} & attrs.keys():
            raise serializers.ValidationError(
                {"payload": ["Send at least one of payload, tags and ttl_seconds."]}
            )
        return attrs


class ContextQuerySerializer(serializers.Serializer):
    agent_id = serializers.RegexField(AGENT_ID_RE.pattern, max_length=64, required=False)
    context_type = serializers.ChoiceField(CONTEXT_TYPES, required=False)
    tag = serializers.ListField(
        child=serializers.RegexField(TAG_RE.pattern, max_length=64),
        required=False,
        max_length=5,
        help_text="Repeatable: every tag must be on the entry.",
    )
    since = serializers.DateTimeField(
        required=False, help_text="ISO 8601; entries written at or after this moment."
    )
    key = serializers.RegexField(KEY_RE.pattern, max_length=200, required=False)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, default=100)
    cursor = serializers.CharField(
        required=False, max_length=512, help_text="next_cursor of the previous page."
    )

    def validate_cursor(self, value):
        try:
            return services.Cursor.decode(value)
        except ValueError:
            raise serializers.ValidationError("Not a cursor from this API.") from None


class ContextPageSerializer(serializers.Serializer):
    count = serializers.IntegerField(
        help_text="Entries matching the filters when the walk began, exact up to a cap."
    )
    count_exact = serializers.BooleanField(help_text="False when count stopped at the cap.")
    results = ContextEntrySerializer(many=True)
    next_cursor = serializers.CharField(allow_null=True)


class ContextVersionSerializer(serializers.Serializer):
    version = serializers.IntegerField()
    payload = serializers.JSONField()
    tags = serializers.ListField(child=serializers.CharField())
    ttl_seconds = serializers.IntegerField(allow_null=True)
    updated_at = serializers.DateTimeField()


class ContextHistorySerializer(serializers.Serializer):
    context_id = serializers.UUIDField()
    version = serializers.IntegerField()
    results = ContextVersionSerializer(many=True)
