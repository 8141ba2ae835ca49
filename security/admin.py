from django.contrib import admin

from .models import AccessPolicy, AuditEvent, PolicySettings
from .services import audit_record, policies_changed


class AuditedAdmin(admin.ModelAdmin):
    """Every change an operator makes here lands in the audit log and refreshes policies."""

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        policies_changed()
        audit_record(
            actor=request.user,
            action="policy_changed" if change else "policy_created",
            target=str(obj),
            source=request.META.get("REMOTE_ADDR", ""),
            detail={"fields": list(form.changed_data)},
        )

    def delete_model(self, request, obj):
        target = str(obj)
        super().delete_model(request, obj)
        policies_changed()
        audit_record(
            actor=request.user,
            action="policy_deleted",
            target=target,
            source=request.META.get("REMOTE_ADDR", ""),
        )

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self.delete_model(request, obj)


@admin.register(AccessPolicy)
class AccessPolicyAdmin(AuditedAdmin):
    list_display = [
        "name",
        "enabled",
        "effect",
        "subject_kind",
        "subject",
        "action",
        "target",
        "priority",
    ]
    list_filter = ["enabled", "effect", "action", "subject_kind"]
    list_editable = ["enabled"]
    search_fields = ["name", "subject", "target"]


@admin.register(PolicySettings)
class PolicySettingsAdmin(AuditedAdmin):
    list_display = ["__str__", "updated_at"]

    def has_add_permission(self, request):
        return not PolicySettings.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["at", "actor_type", "actor", "action", "target", "outcome", "source"]
    list_filter = ["outcome", "actor_type", "action", "at"]
    search_fields = ["actor", "action", "target", "source"]
    date_hierarchy = "at"
    show_full_result_count = False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
