"""REST for the shared context store: thin views over contexts.services.

Versions travel as HTTP validators: every entry answers `ETag: "<version>"`, writes name the
version they read in `If-Match`, and a GET with a matching `If-None-Match` answers 304.
"""

import re
import uuid

from django.conf import settings
from django.urls import reverse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView

from agents.api import PayloadTooLarge
from agents.permissions import IsAgent, is_operator, operator_may, request_agent

from . import services
from .serializers import (
    ContextCreateSerializer,
    ContextEntrySerializer,
    ContextHistorySerializer,
    ContextPageSerializer,
    ContextPatchSerializer,
    ContextQuerySerializer,
    ContextReplaceSerializer,
    ContextVersionSerializer,
)

# A strong or weak entity tag holding a version number. Weak ones are accepted because proxies
# (nginx with gzip, for one) weaken ETags on the way, and the version alone names the content.
ETAG_RE = re.compile(r'^(?:W/)?"?([0-9]{1,18})"?\Z')
ANY = "*"

IF_MATCH = OpenApiParameter(
    "If-Match", str, OpenApiParameter.HEADER, description='"<version>" you read, or *.'
)
ERRORS = {
    403: OpenApiResponse(description="Not the owner, or not allowed for this context type."),
    404: OpenApiResponse(description="No such entry, or it has expired."),
    409: OpenApiResponse(
        description="A keyed write would change the entry's type, or raced another write."
    ),
    412: OpenApiResponse(description="Version mismatch; the body names current_version."),
    413: OpenApiResponse(description="Payload over the configured limit."),
    428: OpenApiResponse(description="If-Match missing."),
}


class IsAgentOrPermittedOperator(BasePermission):
    """Agents (each context type under the access policies), or operators with the permission.

    Operators use the store under the same Django model permissions as in the admin: viewing
    entries to read them, deleting entries to delete them; they never write.
    """

    message = "This call is for agents, and for operators with permission on context entries."
    OPERATOR_PERMISSIONS = {
        "GET": "contexts.view_contextentry",
        "HEAD": "contexts.view_contextentry",
        "DELETE": "contexts.delete_contextentry",
    }

    def has_permission(self, request, view):
        if request_agent(request) is not None:
            return True
        permission = self.OPERATOR_PERMISSIONS.get(request.method)
        if permission is None:
            # Writes are for owners; an operator learns why rather than "no permission".
            return is_operator(request)
        return operator_may(request, permission)


def _version_header(request, name: str):
    """Read If-Match / If-None-Match: None when absent, ANY for *, else the version number."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    value = raw.strip()
    if value == ANY:
        return ANY
    match = ETAG_RE.match(value)
    if match is None:
        problem = f'Must be one entity tag such as "3" (a version) or *, got {raw[:40]!r}.'
        raise exceptions.ValidationError({name: [problem]})
    return int(match.group(1))


def _context_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise services.ContextNotFound("No such context entry (or it has expired).") from None


def _entry_response(entry, status_code=status.HTTP_200_OK, **headers) -> Response:
    return Response(entry.as_dict(), status=status_code, headers={"ETag": entry.etag, **headers})


class ContextAPIView(APIView):
    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        # Refuse an oversized body before parsing it: the JSON parser would read all of it.
        if request.method in ("POST", "PUT", "PATCH"):
            try:
                length = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if length > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
                raise PayloadTooLarge(
                    f"Request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."
                )

    def handle_exception(self, exc):
        if isinstance(exc, services.VersionMismatch):
            headers = {}
            if exc.current_version is not None:
                headers["ETag"] = f'"{exc.current_version}"'
            body = {"detail": exc.detail, "code": exc.code, "current_version": exc.current_version}
            return Response(body, status=exc.status, headers=headers)
        return super().handle_exception(exc)


class ContextListView(ContextAPIView):
    """Share an entry, or query the shared entries newest first."""

    def get_permissions(self):
        if self.request.method == "POST":
            return [IsAgent()]
        return [IsAgentOrPermittedOperator()]

    @extend_schema(
        operation_id="contexts_list",
        parameters=[ContextQuerySerializer],
        responses=ContextPageSerializer,
    )
    def get(self, request):
        query = ContextQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        data = query.validated_data
        page = services.contexts_query(
            reader=request_agent(request),
            agent_id=data.get("agent_id"),
            context_type=data.get("context_type"),
            tags=data.get("tag", ()),
            since=data.get("since"),
            key=data.get("key"),
            limit=data["limit"],
            cursor=data.get("cursor"),
        )
        return Response(
            {
                "count": page.count,
                "count_exact": page.count_exact,
                "results": [entry.as_dict() for entry in page.results],
                "next_cursor": page.next_cursor,
            }
        )

    @extend_schema(
        request=ContextCreateSerializer,
        parameters=[
            OpenApiParameter(
                "If-Match",
                str,
                OpenApiParameter.HEADER,
                description="Keyed writes: update only this version.",
            ),
            OpenApiParameter(
                "If-None-Match",
                str,
                OpenApiParameter.HEADER,
                description="Keyed writes: * creates only.",
            ),
        ],
        responses={201: ContextEntrySerializer, 200: ContextEntrySerializer, **ERRORS},
    )
    def post(self, request):
        serializer = ContextCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if_match = _version_header(request, "If-Match")
        if_none_match = _version_header(request, "If-None-Match")
        key = data.get("key")
        if key is None and (if_match is not None or if_none_match is not None):
            raise exceptions.ValidationError(
                {"key": ["If-Match and If-None-Match apply to a POST only with a key (an upsert)."]}
            )
        if if_none_match not in (None, ANY):
            raise exceptions.ValidationError({"If-None-Match": ["Only * is meaningful here."]})
        entry, created = services.context_create(
            owner=request_agent(request),
            context_type=data["context_type"],
            payload=data["payload"],
            tags=data["tags"],
            ttl_seconds=data.get("ttl_seconds", services.UNSET),
            key=key,
            expected_version=None if if_match in (None, ANY) else if_match,
            create_only=if_none_match == ANY,
        )
        if not created:
            return _entry_response(entry)
        location = reverse("context-detail", kwargs={"context_id": str(entry.id)})
        return _entry_response(entry, status.HTTP_201_CREATED, Location=location)


class ContextDetailView(ContextAPIView):
    """Read, change or delete one entry."""

    permission_classes = [IsAgentOrPermittedOperator]

    @extend_schema(responses={200: ContextEntrySerializer, 304: None, 404: ERRORS[404]})
    def get(self, request, context_id):
        entry = services.context_get(
            context_id=_context_id(context_id), reader=request_agent(request)
        )
        if_none_match = _version_header(request, "If-None-Match")
        if if_none_match == ANY or if_none_match == entry.version:
            return Response(status=status.HTTP_304_NOT_MODIFIED, headers={"ETag": entry.etag})
        return _entry_response(entry)

    def _update(self, request, context_id, serializer_class, *, replace: bool):
        serializer = serializer_class(data=request.data)
        serializer.is_valid(raise_exception=True)
        changes = dict(serializer.validated_data)
        if replace and "ttl_seconds" not in changes:
            # A full replace without ttl_seconds means the default, as on create.
            changes["ttl_seconds"] = services.UNSET
        if_match = _version_header(request, "If-Match")
        if if_match is None:
            expected = services.UNSET  # the service answers 428 once owner and entry check out
        elif if_match == ANY:
            expected = None
        else:
            expected = if_match
        entry = services.context_update(
            context_id=_context_id(context_id),
            writer=request_agent(request),
            expected_version=expected,
            changes=changes,
        )
        return _entry_response(entry)

    @extend_schema(
        request=ContextReplaceSerializer,
        parameters=[IF_MATCH],
        responses={200: ContextEntrySerializer, **ERRORS},
    )
    def put(self, request, context_id):
        return self._update(request, context_id, ContextReplaceSerializer, replace=True)

    @extend_schema(
        request=ContextPatchSerializer,
        parameters=[IF_MATCH],
        responses={200: ContextEntrySerializer, **ERRORS},
    )
    def patch(self, request, context_id):
        return self._update(request, context_id, ContextPatchSerializer, replace=False)

    @extend_schema(
        parameters=[IF_MATCH],
        responses={204: None, 403: ERRORS[403], 404: ERRORS[404], 412: ERRORS[412]},
    )
    def delete(self, request, context_id):
        if_match = _version_header(request, "If-Match")
        services.context_delete(
            context_id=_context_id(context_id),
            agent=request_agent(request),
            operator=is_operator(request),
            expected_version=None if if_match in (None, ANY) else if_match,
            actor=request.user if is_operator(request) else None,
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class ContextVersionsView(ContextAPIView):
    """The entry's last versions, newest (the current one) first."""

    permission_classes = [IsAgentOrPermittedOperator]

    @extend_schema(
        operation_id="contexts_versions_list",
        responses={200: ContextHistorySerializer, 404: ERRORS[404]},
    )
    def get(self, request, context_id):
        entry, versions = services.context_versions(
            context_id=_context_id(context_id), reader=request_agent(request)
        )
        return Response(
            {"context_id": str(entry.id), "version": entry.version, "results": versions},
            headers={"ETag": entry.etag},
        )


class ContextVersionDetailView(ContextAPIView):
    permission_classes = [IsAgentOrPermittedOperator]

    @extend_schema(responses={200: ContextVersionSerializer, 404: ERRORS[404]})
    def get(self, request, context_id, version):
        row = services.context_version(
            context_id=_context_id(context_id), reader=request_agent(request), version=version
        )
        return Response(row)
