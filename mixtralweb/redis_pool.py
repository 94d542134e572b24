"""One synchronous Redis client per process and URL, over a connection pool.

`redis.Redis.from_url()` per call opens a new connection each time (a TCP
handshake on the stop path, for example). redis-py's pool notices a fork and
starts afresh in the child, so Celery's prefork children can share this safely.
"""

from __future__ import annotations

import functools

import redis
from django.conf import settings


@functools.cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def client() -> redis.Redis:
    return _client(settings.REDIS_URL)
