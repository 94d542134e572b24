"""Monitoring pages: usage history, dashboards, GPUs, Prometheus."""

urlpatterns: list = []
