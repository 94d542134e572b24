from django.urls import path

from .consumers import ChatConsumer
from .jobs.consumers import JobConsumer

websocket_urlpatterns = [
    path("ws/chat/", ChatConsumer.as_asgi()),
    path("ws/jobs/", JobConsumer.as_asgi()),
]
