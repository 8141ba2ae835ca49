from django.contrib import admin

from .models import SweepRun


@admin.register(SweepRun)
class SweepRunAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "last_run_at",
        "last_duration_seconds",
        "last_result",
        "runs",
        "failures",
    ]
    readonly_fields = [field.name for field in SweepRun._meta.fields]
    search_fields = ["name"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
