"""Operator pages for the registry: agents, enrollment keys, issued tokens and connections.

Every state change goes through agents.services, exactly as the REST API does. Raw secrets (agent
secrets, enrollment keys) are shown once on a page rendered straight from the request that made
them, never stored in a message, the session or the database; digests are never shown at all.
"""

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Count, F, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html
from django.utils.http import urlencode

from . import services
from .models import Agent, Capability, Connection, EnrollmentKey, IssuedToken

# RFC 6455 normal closure: the operator ended the session, nothing is wrong with the agent, so it
# may reconnect. Disabling uses 4403 instead, which tells the agent not to come back.
CLOSE_OPERATOR_DISCONNECT = 1000

# Upper bounds keep form input inside what the database column and timedelta can hold.
MAX_INT_COLUMN = 2**31 - 1
MAX_EXPIRES_IN = 10 * 366 * 86400


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def secret_once_response(request, model_admin, *, title, intro, secrets, continue_url):
    """Render raw secrets on a page that is never cached; nothing keeps them after this response."""
    context = {
        **model_admin.admin_site.each_context(request),
        "title": title,
        "intro": intro,
        "secrets": secrets,
        "continue_url": continue_url,
        "opts": model_admin.opts,
    }
    response = TemplateResponse(request, "admin/secret_once.html", context)
    add_never_cache_headers(response)
    return response


class ChangePermissionActionsMixin:
    """Let operators with the model's change permission run actions on read-only pages.

    The pages refuse edits (has_change_permission is False) because these rows change only through
    services; the actions that call those services still need a permission to check.
    """

    def has_operate_permission(self, request):
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")


# --- Agents -------------------------------------------------------------------------------------


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("online", "online"), ("offline", "offline")]

    def queryset(self, request, queryset):
        if self.value() == "online":
            return queryset.online()
        if self.value() == "offline":
            return queryset.offline()
        return queryset


class CapabilityInline(admin.TabularInline):
    model = Capability
    fields = ("name", "version", "description")
    extra = 0


class OpenConnectionInline(admin.TabularInline):
    model = Connection
    verbose_name = "open connection"
    verbose_name_plural = "open connections"
    fields = ("session_id", "server", "remote_addr", "user_agent", "opened_at", "last_seen_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def get_queryset(self, request):
        return super().get_queryset(request).open()

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = (
        "agent_id",
        "name",
        "state",
        "status",
        "last_seen_at",
        "open_connections",
        "capability_names",
    )
    list_filter = ("state", StatusFilter, "created_at")
    search_fields = ("agent_id", "name", "capabilities__name")
    search_help_text = "Agent id, name or capability name."
    ordering = ("agent_id",)
    # secret_digest is deliberately absent from every field list below.
    fieldsets = (
        (None, {"fields": ("agent_id", "name", "description", "metadata")}),
        (
            "State",
            {
                "fields": (
                    "state",
                    "status",
                    "last_seen_at",
                    "open_connections",
                    "tokens",
                    "tokens_valid_after",
                    "enrolled_with",
                    "created_at",
                    "updated_at",
                )
            },
        ),
    )
    # State changes only through the actions, which also revoke tokens and close sockets.
    readonly_fields = (
        "agent_id",
        "state",
        "status",
        "last_seen_at",
        "open_connections",
        "tokens",
        "tokens_valid_after",
        "enrolled_with",
        "created_at",
        "updated_at",
    )
    inlines = (CapabilityInline, OpenConnectionInline)
    actions = ("disable", "enable", "deregister", "revoke_tokens", "rotate_secret")

    def get_queryset(self, request):
        open_count = (
            Connection.objects.open()
            .filter(agent=OuterRef("pk"))
            .order_by()
            .values("agent")
            .annotate(n=Count("pk"))
            .values("n")
        )
        return (
            super()
            .get_queryset(request)
            .with_open_connection()
            .annotate(open_connection_count=Coalesce(Subquery(open_count), Value(0)))
            .prefetch_related("capabilities")
        )

    # Agents register through the API with an enrollment key, and deleting one would erase the
    # history that deregistering keeps.
    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        editable = [f for f in ("name", "description", "metadata") if f in form.changed_data]
        services.agent_update(agent=obj, **{f: form.cleaned_data[f] for f in editable})

    @admin.display(description="status")
    def status(self, obj):
        return obj.get_status()

    @admin.display(description="open connections", ordering="open_connection_count")
    def open_connections(self, obj):
        return obj.open_connection_count

    @admin.display(description="capabilities")
    def capability_names(self, obj):
        return ", ".join(str(capability) for capability in obj.capabilities.all())

    @admin.display(description="tokens")
    def tokens(self, obj):
        url = reverse("admin:agents_issuedtoken_changelist")
        return format_html(
            '<a href="{}?{}">issued tokens</a>', url, urlencode({"agent__exact": obj.pk})
        )

    @admin.action(
        description="Disable selected agents (revoke tokens, close sockets)", permissions=["change"]
    )
    def disable(self, request, queryset):
        # Deregistering is final: a retired agent disabled here could later be enabled again.
        agents = list(queryset.exclude(state=Agent.State.DEREGISTERED))
        for agent in agents:
            services.agent_disable(agent=agent, actor=request.user)
            self.log_change(request, agent, "Disabled.")
        self.message_user(request, f"Disabled {plural(len(agents), 'agent')}.", messages.SUCCESS)

    @admin.action(description="Enable selected disabled agents", permissions=["change"])
    def enable(self, request, queryset):
        enabled = 0
        for agent in queryset.filter(state=Agent.State.DISABLED):
            services.agent_enable(agent=agent, actor=request.user)
            self.log_change(request, agent, "Enabled.")
            enabled += 1
        self.message_user(request, f"Enabled {plural(enabled, 'agent')}.", messages.SUCCESS)

    @admin.action(
        description="Deregister selected agents (history is kept)", permissions=["change"]
    )
    def deregister(self, request, queryset):
        for agent in queryset:
            services.agent_deregister(agent=agent, actor=request.user)
            self.log_change(request, agent, "Deregistered.")
        self.message_user(
            request, f"Deregistered {plural(len(queryset), 'agent')}.", messages.SUCCESS
        )

    @admin.action(
        description="Revoke all tokens of selected agents (close their sockets)",
        permissions=["change"],
    )
    def revoke_tokens(self, request, queryset):
        revoked = 0
        for agent in queryset:
            # The same pairing the services use when they retire credentials: no token survives,
            # and sockets opened with one end once the revocation commits.
            with transaction.atomic():
                revoked += services.agent_tokens_revoke(agent=agent, actor=request.user)
                services.connections_close(agent=agent, code=services.CLOSE_NOT_AUTHENTICATED)
            self.log_change(request, agent, "Revoked all tokens.")
        self.message_user(request, f"Revoked {plural(revoked, 'token')}.", messages.SUCCESS)

    @admin.action(
        description="Rotate secret of selected agents (shows the new secret once)",
        permissions=["change"],
    )
    def rotate_secret(self, request, queryset):
        secrets = []
        for agent in queryset:
            secrets.append(
                (agent.agent_id, services.agent_rotate_secret(agent=agent, actor=request.user))
            )
            self.log_change(request, agent, "Rotated the secret.")
        return secret_once_response(
            request,
            self,
            title="New agent secrets",
            intro=(
                "Give each agent its new secret now: it is not stored and will not be shown again. "
                "Every token issued under the old secret is revoked."
            ),
            secrets=secrets,
            continue_url=reverse("admin:agents_agent_changelist"),
        )


# --- Enrollment keys ----------------------------------------------------------------------------


class EnrollmentKeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [(s, s) for s in ("usable", "revoked", "expired", "spent")]

    def queryset(self, request, queryset):
        now = timezone.now()
        live = queryset.filter(revoked_at__isnull=True)
        unexpired = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        match self.value():
            case "usable":
                return queryset.usable()
            case "revoked":
                return queryset.filter(revoked_at__isnull=False)
            case "expired":
                return live.filter(expires_at__lte=now)
            case "spent":
                return live.filter(unexpired, max_uses__isnull=False, uses__gte=F("max_uses"))
        return queryset


class EnrollmentKeyCreateForm(forms.ModelForm):
    max_uses = forms.IntegerField(
        required=False, min_value=1, max_value=MAX_INT_COLUMN, help_text="Empty means unlimited."
    )
    expires_in = forms.IntegerField(
        label="Expires in (seconds)",
        required=False,
        min_value=1,
        max_value=MAX_EXPIRES_IN,
        help_text="Empty means the key never expires.",
    )

    class Meta:
        model = EnrollmentKey
        fields = ("label", "max_uses")


@admin.register(EnrollmentKey)
class EnrollmentKeyAdmin(admin.ModelAdmin):
    list_display = (
        "key_prefix",
        "label",
        "status",
        "usage",
        "expires_at",
        "created_at",
        "created_by",
    )
    list_filter = (EnrollmentKeyStatusFilter, "created_at")
    list_select_related = ("created_by",)
    search_fields = ("label", "^prefix")
    search_help_text = "Label or key prefix."
    add_form = EnrollmentKeyCreateForm
    add_fieldsets = ((None, {"fields": ("label", "max_uses", "expires_in")}),)
    # key_digest is deliberately absent from every field list below.
    fieldsets = (
        (None, {"fields": ("key_prefix", "label")}),
        (
            "Use",
            {
                "fields": (
                    "status",
                    "usage",
                    "expires_at",
                    "revoked_at",
                    "enrolled_agents",
                    "created_at",
                    "created_by",
                )
            },
        ),
    )
    readonly_fields = (
        "key_prefix",
        "status",
        "usage",
        "expires_at",
        "revoked_at",
        "enrolled_agents",
        "created_at",
        "created_by",
    )
    actions = ("revoke",)

    def get_fieldsets(self, request, obj=None):
        return self.add_fieldsets if obj is None else super().get_fieldsets(request, obj)

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else super().get_readonly_fields(request, obj)

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = self.add_form
        return super().get_form(request, obj, **kwargs)

    # Revoking keeps the record of which key admitted which agent.
    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        if change:
            # Only the label is editable; a full save would write back a stale use count.
            if "label" in form.changed_data:
                obj.save(update_fields=["label"])
            return
        key, raw = services.enrollment_key_create(
            label=form.cleaned_data["label"],
            max_uses=form.cleaned_data["max_uses"],
            expires_in=form.cleaned_data["expires_in"],
            created_by=request.user,
        )
        obj.pk = key.pk
        obj.refresh_from_db()
        obj._state.adding = False
        # Handed to response_add on the request itself, so the raw key outlives only this request.
        request.hub_new_enrollment_key = raw

    def response_add(self, request, obj, post_url_continue=None):
        raw = getattr(request, "hub_new_enrollment_key", None)
        if raw is None:
            return super().response_add(request, obj, post_url_continue)
        return secret_once_response(
            request,
            self,
            title="New enrollment key",
            intro=(
                "Copy the key now: only its digest is stored, so it cannot be shown again. "
                "Agents register with it in the X-Enrollment-Key header."
            ),
            secrets=[(str(obj), raw)],
            continue_url=reverse("admin:agents_enrollmentkey_changelist"),
        )

    @admin.display(description="key", ordering="prefix")
    def key_prefix(self, obj):
        return f"{obj.prefix}…"

    @admin.display(description="status")
    def status(self, obj):
        return obj.get_status()

    @admin.display(description="uses")
    def usage(self, obj):
        return f"{obj.uses} / {'∞' if obj.max_uses is None else obj.max_uses}"

    @admin.display(description="enrolled agents")
    def enrolled_agents(self, obj):
        url = reverse("admin:agents_agent_changelist")
        count = obj.agents.count()
        return format_html(
            '<a href="{}?{}">{}</a>',
            url,
            urlencode({"enrolled_with__exact": obj.pk}),
            plural(count, "agent"),
        )

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke(self, request, queryset):
        for key in queryset:
            services.enrollment_key_revoke(key=key, actor=request.user)
            self.log_change(request, key, "Revoked.")
        self.message_user(request, f"Revoked {plural(len(queryset), 'key')}.", messages.SUCCESS)


# --- Issued tokens ------------------------------------------------------------------------------


class TokenStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [(s, s) for s in ("valid", "revoked", "expired")]

    def queryset(self, request, queryset):
        now = timezone.now()
        match self.value():
            case "valid":
                return queryset.filter(revoked_at__isnull=True, expires_at__gt=now)
            case "revoked":
                return queryset.filter(revoked_at__isnull=False)
            case "expired":
                return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        return queryset


@admin.register(IssuedToken)
class IssuedTokenAdmin(ChangePermissionActionsMixin, admin.ModelAdmin):
    list_display = (
        "jti_prefix",
        "agent",
        "token_type",
        "status",
        "issued_at",
        "expires_at",
        "revoked_at",
    )
    list_filter = ("token_type", TokenStatusFilter, "issued_at")
    list_select_related = ("agent",)
    search_fields = ("=agent__agent_id", "^jti")
    search_help_text = "Exact agent id, or the start of a token id."
    show_full_result_count = False
    fields = (
        "jti_prefix",
        "agent",
        "token_type",
        "status",
        "issued_at",
        "expires_at",
        "revoked_at",
    )
    readonly_fields = fields
    actions = ("revoke",)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="token id", ordering="jti")
    def jti_prefix(self, obj):
        return f"{obj.jti[:8]}…"

    @admin.display(description="status")
    def status(self, obj):
        return obj.get_status()

    @admin.action(
        description="Revoke selected tokens (close sockets opened with them)",
        permissions=["operate"],
    )
    def revoke(self, request, queryset):
        count = 0
        for token in queryset.filter(revoked_at__isnull=True):
            services.token_revoke(token=token, actor=request.user)
            count += 1
        self.message_user(request, f"Revoked {plural(count, 'token')}.", messages.SUCCESS)


# --- Connections --------------------------------------------------------------------------------


class OpenFilter(admin.SimpleListFilter):
    title = "open"
    parameter_name = "open"

    def lookups(self, request, model_admin):
        return [("yes", "open"), ("no", "closed")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.open()
        if self.value() == "no":
            return queryset.filter(closed_at__isnull=False)
        return queryset


@admin.register(Connection)
class ConnectionAdmin(ChangePermissionActionsMixin, admin.ModelAdmin):
    list_display = (
        "session_id",
        "agent",
        "server",
        "remote_addr",
        "opened_at",
        "last_seen_at",
        "closed_at",
        "close_code",
        "is_open",
    )
    list_filter = (OpenFilter, "server", "opened_at")
    list_select_related = ("agent",)
    search_fields = ("=agent__agent_id", "^remote_addr")
    search_help_text = "Exact agent id, or the start of a remote address."
    show_full_result_count = False
    fields = (
        "session_id",
        "agent",
        "server",
        "channel_name",
        "remote_addr",
        "user_agent",
        "opened_at",
        "last_seen_at",
        "closed_at",
        "close_code",
    )
    readonly_fields = fields
    actions = ("disconnect",)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="open", boolean=True)
    def is_open(self, obj):
        return obj.is_open

    @admin.action(description="Disconnect selected connections", permissions=["operate"])
    def disconnect(self, request, queryset):
        # The consumer holding each socket records the close when it ends; a row whose process
        # died stays open until the liveness sweep reaps it.
        count = services.connections_close(
            connections=queryset.open(), code=CLOSE_OPERATOR_DISCONNECT, actor=request.user
        )
        self.message_user(
            request, f"Asked {plural(count, 'open connection')} to close.", messages.SUCCESS
        )
