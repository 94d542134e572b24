"""Monitoring pages: usage history, dashboards, GPUs, alerts, Prometheus."""

from django.urls import path

from . import views

urlpatterns = [
    path("usage/", views.my_usage, name="my_usage"),
    path("usage/requests/<int:pk>/", views.request_detail, name="request_detail"),
    path("usage/teams/<int:team_id>/", views.team_usage, name="team_usage"),
    path("usage/admin/", views.admin_overview, name="admin_overview"),
    path("gpus/", views.gpus, name="gpus"),
    path("alerts/", views.alerts, name="alerts"),
    path("alerts/<int:alert_id>/acknowledge/", views.alert_acknowledge, name="alert_acknowledge"),
    path("metrics", views.metrics, name="metrics"),
]
