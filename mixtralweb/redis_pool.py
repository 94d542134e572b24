"""Redis clients: one synchronous client per process and URL, over a connection
pool, and the asyncio clients' one configuration.

`redis.Redis.from_url()` per call opens a new connection each time (a TCP
handshake on the stop path, for example). redis-py's pool notices a fork and
starts afresh in the child, so Celery's prefork children can share this safely.
An asyncio client is bound to its event loop, so each owner makes its own.
"""

from __future__ import annotations

import functools

import redis
import redis.asyncio as aioredis
from django.conf import settings


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def client() -> redis.Redis:
    return _client(settings.REDIS_URL)


def async_client() -> aioredis.Redis:
    """A new asyncio client, retrying through a Redis restart (settings)."""
    return aioredis.from_url(settings.REDIS_URL, **settings.REDIS_ASYNC_OPTIONS)
