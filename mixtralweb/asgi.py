"""ASGI entry point: HTTP goes to Django, websockets to the inference consumers."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mixtralweb.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from inference.routing import websocket_urlpatterns as inference_ws  # noqa: E402
from mixtralweb.body_limits import BodySizeLimit  # noqa: E402
from monitoring.routing import websocket_urlpatterns as monitoring_ws  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": BodySizeLimit(django_asgi_app),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(inference_ws + monitoring_ws))
        ),
    }
)
