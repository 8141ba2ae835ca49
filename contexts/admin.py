"""Operator pages for the shared context store: read-only entries with their history.

Entries change only through the API, so the pages show them; deleting (one entry or an
action on many) goes through contexts.services, which announces each deletion to watchers.
"""

import json
import uuid
from datetime import timedelta

from django.contrib import admin
from django.contrib.admin.views.main import ERROR_FLAG, PAGE_VAR
from django.db.models import Q
from django.utils import timezone
from django.utils.html import format_html

from . import services
from .models import ContextEntry, ContextTag, ContextVersion


def pretty_json(value) -> str:
    return format_html(
        '<pre style="white-space: pre-wrap; margin: 0">{}</pre>',
        json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False),
    )


class TextFilter(admin.SimpleListFilter):
    """Filter by one value typed by the operator; a dropdown of every value would not scale."""

    template = "admin/contexts/text_filter.html"
    placeholder = ""

    def lookups(self, request, model_admin):
        return ()

    def has_output(self):
        return True

    def choices(self, changelist):
        keep = {
            name: value
            for name, value in changelist.params.items()
            if name not in (self.parameter_name, PAGE_VAR, ERROR_FLAG)
        }
        yield {
            "value": self.value() or "",
            "placeholder": self.placeholder,
            "hidden": sorted(keep.items()),
            "clear_url": changelist.get_query_string(remove=[self.parameter_name]),
        }

    def queryset(self, request, queryset):
        value = (self.value() or "").strip()
        return self.filter_value(queryset, value) if value else queryset

    def filter_value(self, queryset, value):
        raise NotImplementedError


class OwnerFilter(TextFilter):
    title = "owner"
    parameter_name = "agent_id"
    placeholder = "agent_id"

    def filter_value(self, queryset, value):
        return queryset.filter(owner__agent_id=value)


class TagFilter(TextFilter):
    title = "tag"
    parameter_name = "tag"
    placeholder = "tag"

    def filter_value(self, queryset, value):
        return queryset.filter(id__in=ContextTag.objects.filter(tag=value).values("entry_id"))


class ExpiryFilter(admin.SimpleListFilter):
    title = "expiry"
    parameter_name = "expiry"

    def lookups(self, request, model_admin):
        return [
            ("live", "live"),
            ("soon", "expires within an hour"),
            ("expired", "expired, awaiting purge"),
            ("never", "never expires"),
        ]

    def queryset(self, request, queryset):
        now = timezone.now()
        value = self.value()
        if value == "live":
            return queryset.live(now)
        if value == "soon":
            return queryset.filter(expires_at__gt=now, expires_at__lte=now + timedelta(hours=1))
        if value == "expired":
            return queryset.expired(now)
        if value == "never":
            return queryset.filter(expires_at__isnull=True)
        return queryset


class ContextVersionInline(admin.TabularInline):
    model = ContextVersion
    verbose_name = "earlier version"
    verbose_name_plural = "history (earlier versions, newest first)"
    fields = ("version", "updated_at", "ttl_seconds", "tags", "payload_display")
    readonly_fields = fields
    ordering = ("-version",)
    extra = 0
    can_delete = False

    @admin.display(description="payload")
    def payload_display(self, obj):
        return pretty_json(obj.payload)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(ContextEntry)
class ContextEntryAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "owner",
        "context_type",
        "key",
        "tag_list",
        "version",
        "updated_at",
        "expires_at",
        "state",
    )
    list_filter = ("context_type", ExpiryFilter, OwnerFilter, TagFilter)
    list_select_related = ("owner",)
    search_fields = ("=owner__agent_id", "key", "=tag_rows__tag")
    search_help_text = "An owner's agent_id, a key (or part of one), a tag, or a context_id."
    ordering = ("-updated_at", "-id")
    show_full_result_count = False
    list_per_page = 50
    fields = (
        "id",
        "owner",
        "context_type",
        "key",
        "tag_list",
        "version",
        "ttl_seconds",
        "created_at",
        "updated_at",
        "expires_at",
        "state",
        "payload_display",
    )
    readonly_fields = fields
    inlines = (ContextVersionInline,)
    actions = ("delete_selected",)

    @admin.display(description="tags")
    def tag_list(self, obj):
        return ", ".join(obj.tags)

    @admin.display(description="state")
    def state(self, obj):
        if obj.expires_at is None:
            return "live, never expires"
        return "expired, awaiting purge" if obj.is_expired() else "live"

    @admin.display(description="payload")
    def payload_display(self, obj):
        return pretty_json(obj.payload)

    def get_search_results(self, request, queryset, search_term):
        try:
            context_id = uuid.UUID(search_term.strip())
        except ValueError:
            return super().get_search_results(request, queryset, search_term)
        return queryset.filter(Q(pk=context_id)), False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def delete_model(self, request, obj):
        services.contexts_delete_by_operator(
            entries=ContextEntry.objects.filter(pk=obj.pk), actor=request.user
        )

    def delete_queryset(self, request, queryset):
        services.contexts_delete_by_operator(entries=queryset, actor=request.user)
