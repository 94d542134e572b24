"""Websocket routes of the monitoring app (live GPU charts)."""

from django.urls import path

from .consumers import GpuConsumer

websocket_urlpatterns = [
    path("ws/gpu/", GpuConsumer.as_asgi()),
]
