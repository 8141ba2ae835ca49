"""Operator pages, mounted under /admin/ops/ and guarded by the admin site's staff login."""

from django.contrib import admin
from django.urls import path

from . import views

app_name = "ops"

urlpatterns = [
    path("dashboard/", admin.site.admin_view(views.dashboard), name="dashboard"),
    path("dashboard/data/", admin.site.admin_view(views.dashboard_data), name="dashboard-data"),
]
