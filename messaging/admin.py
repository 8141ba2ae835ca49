"""Operator pages for messaging: the read-only message log, deliveries, dead letters, topics.

The log can be large, so searches are exact matches on indexed columns, list counts are skipped,
and per-message delivery states come from correlated subqueries evaluated for one page of rows.
Dead letters change only through messaging.services, as the sweeps do.
"""

import json
import uuid

from django.contrib import admin, messages
from django.contrib.admin.views.main import ERROR_FLAG, PAGE_VAR
from django.db.models import Count, Exists, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce
from django.forms.models import BaseInlineFormSet
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode

from . import services
from .models import DeadLetter, Delivery, Message, Subscription

# A broadcast can reach thousands of agents; the message page lists this many deliveries and
# links to the full, paginated delivery list for the rest.
DELIVERY_INLINE_LIMIT = 100


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _as_uuid(text: str):
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the hub itself: operators look, and act only through declared actions."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class AgentIdFilter(admin.SimpleListFilter):
    """Filter by one agent_id typed by the operator; a dropdown of every agent would not scale."""

    template = "admin/agent_id_filter.html"

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
            "hidden": sorted(keep.items()),
            "clear_url": changelist.get_query_string(remove=[self.parameter_name]),
        }

    def queryset(self, request, queryset):
        agent_id = (self.value() or "").strip()
        if agent_id:
            return self.filter_agent(queryset, agent_id)
        return queryset

    def filter_agent(self, queryset, agent_id):
        raise NotImplementedError


# --- Message log --------------------------------------------------------------------------------


class SenderFilter(AgentIdFilter):
    title = "sender"
    parameter_name = "sender"

    def filter_agent(self, queryset, agent_id):
        return queryset.filter(sender__agent_id=agent_id)


class RecipientFilter(AgentIdFilter):
    title = "recipient"
    parameter_name = "recipient"

    def filter_agent(self, queryset, agent_id):
        # Exists rather than a join, so a message never appears twice.
        return queryset.filter(
            Exists(Delivery.objects.filter(message=OuterRef("pk"), recipient__agent_id=agent_id))
        )


class DeliveryStatusFilter(admin.SimpleListFilter):
    title = "a delivery that is"
    parameter_name = "delivery_status"

    def lookups(self, request, model_admin):
        return Delivery.Status.choices

    def queryset(self, request, queryset):
        if self.value() in Delivery.Status.values:
            return queryset.filter(
                Exists(Delivery.objects.filter(message=OuterRef("pk"), status=self.value()))
            )
        return queryset


class CappedDeliveryFormSet(BaseInlineFormSet):
    def get_queryset(self):
        if not hasattr(self, "_capped_queryset"):
            self._capped_queryset = super().get_queryset()[:DELIVERY_INLINE_LIMIT]
        return self._capped_queryset


class DeliveryInline(admin.TabularInline):
    model = Delivery
    formset = CappedDeliveryFormSet
    fields = ("recipient", "seq", "status", "attempts", "delivered_at", "acked_at", "expires_at")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("recipient")

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


def _count_deliveries(status: str):
    per_message = (
        Delivery.objects.filter(message=OuterRef("pk"), status=status)
        .order_by()
        .values("message")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(per_message), Value(0))


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "kind",
        "sender",
        "topic",
        "recipient_count",
        "delivery_states",
        "created_at",
        "expires_at",
    )
    list_filter = ("kind", DeliveryStatusFilter, SenderFilter, RecipientFilter)
    list_select_related = ("sender",)
    date_hierarchy = "created_at"
    # Matched exactly by get_search_results, so each search can use an index.
    search_fields = (
        "id",
        "client_id",
        "topic",
        "sender__agent_id",
        "deliveries__recipient__agent_id",
    )
    search_help_text = "Exact message id, client id, topic, or sender or recipient agent_id."
    show_full_result_count = False
    fields = (
        "id",
        "kind",
        "sender",
        "topic",
        "client_id",
        "reply_to",
        "recipient_count",
        "delivery_states",
        "all_deliveries",
        "created_at",
        "expires_at",
        "pretty_payload",
    )
    readonly_fields = ("reply_to", "delivery_states", "all_deliveries", "pretty_payload")
    inlines = (DeliveryInline,)

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                **{f"n_{status}": _count_deliveries(status) for status in Delivery.Status.values}
            )
        )

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        match = (
            Q(client_id=term)
            | Q(topic=term)
            | Q(sender__agent_id=term)
            | Q(Exists(Delivery.objects.filter(message=OuterRef("pk"), recipient__agent_id=term)))
        )
        if (message_id := _as_uuid(term)) is not None:
            match |= Q(pk=message_id)
        return queryset.filter(match), False

    @admin.display(description="deliveries")
    def delivery_states(self, obj):
        counts = [
            f"{getattr(obj, f'n_{status}')} {status}"
            for status in Delivery.Status.values
            if getattr(obj, f"n_{status}")
        ]
        return ", ".join(counts) or "—"

    @admin.display(description="all deliveries")
    def all_deliveries(self, obj):
        url = reverse("admin:messaging_delivery_changelist")
        return format_html(
            '<a href="{}?{}">{}</a>',
            url,
            urlencode({"message__exact": obj.pk}),
            f"delivery list ({plural(obj.recipient_count, 'recipient')})",
        )

    @admin.display(description="in reply to")
    def reply_to(self, obj):
        if obj.in_reply_to is None:
            return "—"
        url = reverse("admin:messaging_message_change", args=[obj.in_reply_to])
        return format_html('<a href="{}">{}</a>', url, obj.in_reply_to)

    @admin.display(description="payload")
    def pretty_payload(self, obj):
        return format_html("<pre>{}</pre>", json.dumps(obj.payload, indent=2, ensure_ascii=False))


# --- Deliveries and dead letters ----------------------------------------------------------------


class DeliveryRecipientFilter(AgentIdFilter):
    title = "recipient"
    parameter_name = "recipient"

    def filter_agent(self, queryset, agent_id):
        return queryset.filter(recipient__agent_id=agent_id)


class DeliveryColumnsMixin:
    search_fields = ("recipient__agent_id", "message__id")
    search_help_text = "Exact recipient agent_id or message id."

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        match = Q(recipient__agent_id=term)
        if (message_id := _as_uuid(term)) is not None:
            match |= Q(message_id=message_id)
        return queryset.filter(match), False

    @admin.display(description="message", ordering="message")
    def message_link(self, obj):
        url = reverse("admin:messaging_message_change", args=[obj.message_id])
        return format_html('<a href="{}">{}</a>', url, obj.message_id)


@admin.register(Delivery)
class DeliveryAdmin(DeliveryColumnsMixin, ReadOnlyAdmin):
    list_display = (
        "message_link",
        "recipient",
        "seq",
        "status",
        "attempts",
        "delivered_at",
        "acked_at",
        "expires_at",
    )
    list_filter = ("status", DeliveryRecipientFilter)
    list_select_related = ("recipient",)
    show_full_result_count = False
    ordering = ("-pk",)
    fields = (
        "message_link",
        "recipient",
        "seq",
        "status",
        "attempts",
        "delivered_at",
        "acked_at",
        "expires_at",
    )
    readonly_fields = fields


@admin.register(DeadLetter)
class DeadLetterAdmin(DeliveryColumnsMixin, ReadOnlyAdmin):
    list_display = ("message_link", "recipient", "seq", "attempts", "delivered_at")
    list_filter = (DeliveryRecipientFilter,)
    list_select_related = ("recipient",)
    show_full_result_count = False
    ordering = ("-delivered_at",)
    fields = (
        "message_link",
        "recipient",
        "seq",
        "status",
        "attempts",
        "delivered_at",
        "expires_at",
    )
    readonly_fields = fields
    actions = ("redeliver", "purge")

    def get_queryset(self, request):
        return super().get_queryset(request).filter(status=Delivery.Status.DEAD)

    def has_redeliver_permission(self, request):
        return request.user.has_perm("messaging.change_deadletter")

    def has_purge_permission(self, request):
        return request.user.has_perm("messaging.delete_deadletter")

    @admin.action(description="Redeliver selected dead letters", permissions=["redeliver"])
    def redeliver(self, request, queryset):
        count = services.dead_letters_redeliver(deliveries=queryset, actor=request.user)
        self.message_user(
            request, f"Queued {plural(count, 'dead letter')} for delivery again.", messages.SUCCESS
        )

    @admin.action(description="Purge selected dead letters", permissions=["purge"])
    def purge(self, request, queryset):
        count = services.dead_letters_purge(deliveries=queryset, actor=request.user)
        self.message_user(request, f"Purged {plural(count, 'dead letter')}.", messages.SUCCESS)


# --- Topics -------------------------------------------------------------------------------------


@admin.register(Subscription)
class SubscriptionAdmin(ReadOnlyAdmin):
    list_display = ("topic", "agent", "created_at")
    list_select_related = ("agent",)
    search_fields = ("topic", "=agent__agent_id")
    search_help_text = "Topic, or exact agent id."
    fields = list_display
    readonly_fields = fields
