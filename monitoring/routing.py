"""Websocket routes of the monitoring app (live GPU charts)."""

websocket_urlpatterns: list = []
