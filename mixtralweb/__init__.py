"""Project package: settings, URLs, ASGI routing, the Celery app, accounts and teams."""

from .celery import app as celery_app

__all__ = ["celery_app"]
