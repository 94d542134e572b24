"""Tells the chat pages when a model's status changes (docs/protocol.md, `model.status`).

Whoever changes what the status is made of says so, and the status is computed once
there (selectors.model_status) and sent to the model's channel-layer group, which
the chat sockets watching that model have joined: a worker after each heartbeat
write (its state, its load progress, an answer admitted or ended; Announcer), a web process
after queuing an answer or cancelling one still queued, and the reaper each round
(a worker that died says nothing: its heartbeat expires). Nothing polls.

Many processes announce one model; Redis keeps the last status sent with the time
its reading began, so a status is sent only when it differs from the last one, and
never after a newer one (a slow reader does not undo a later change).
"""

from __future__ import annotations

import json
import logging
import threading
import time

from django.db import connection
from redis.exceptions import RedisError

from mixtralweb import namespace, redis_pool

from .models import LanguageModel
from .selectors import model_status
from .streams import announce as group_send
from .workers import live_workers

log = logging.getLogger(__name__)

EVENT = "model.status"
LAST_TTL_S = 3600

# KEYS[1]: the last status sent; ARGV: this reading's start time, its status, a TTL.
# 1 when it is news (newer than the last, and different): then it is sent.
_NEWER_AND_CHANGED_LUA = """
local last = tonumber(redis.call('HGET', KEYS[1], 'stamp') or '0')
if tonumber(ARGV[1]) < last then
    return 0
end
local before = redis.call('HGET', KEYS[1], 'body')
redis.call('HSET', KEYS[1], 'stamp', ARGV[1], 'body', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if before == ARGV[2] then
    return 0
end
return 1
"""
_script = None


def group(model_id: int) -> str:
    """The chat sockets watching one model's status."""
    return namespace.group("status", model_id)


def event(model: LanguageModel, workers: list[dict] | None = None) -> dict:
    """The `model.status` event; `at`: when its reading began (a page shows the
    latest reading it has, whichever way it came)."""
    at = time.time()
    return {"type": EVENT, **model_status(model, workers), "at": at}


def announce(model: LanguageModel, workers: list[dict] | None = None) -> bool:
    """Send the model's status to its watchers if it changed; True if sent. Never
    raises: a status not sent now goes with the next change or the reaper's round."""
    global _script
    try:
        message = event(model, workers)
        client = redis_pool.client()
        if _script is None:
            _script = client.register_script(_NEWER_AND_CHANGED_LUA)
        key = namespace.key("status", model.pk)
        body = json.dumps({k: v for k, v in message.items() if k != "at"}, sort_keys=True)
        args = [repr(message["at"]), body, LAST_TTL_S]
        if not _script(keys=[key], args=args, client=client):
            return False
        try:
            group_send(group(model.pk), message)
        except BaseException:
            client.delete(key)  # not sent after all: the next reading is news again
            raise
        return True
    except (RedisError, OSError):
        log.warning("the status of %s was not announced: Redis is not answering", model)
    except Exception:  # noqa: BLE001 - a status never takes its caller down
        log.exception("the status of %s was not announced", model)
    return False


def announce_model_id(model_id: int) -> bool:
    model = LanguageModel.objects.filter(pk=model_id).first()
    return announce(model) if model is not None else False


def announce_model_named(name: str) -> bool:
    """For a worker: its model read again by name, as the chat pages find it (the
    row the worker loaded may have been registered again since, with a new id)."""
    try:
        model = LanguageModel.objects.filter(name=name).first()
    except Exception:  # noqa: BLE001 - the database is down: the next write tries again
        log.warning("the status of %s was not announced: the database is not answering", name)
        return False
    return announce(model) if model is not None else False


def announce_all() -> int:
    """Every enabled model's status, from one read of the workers; how many were sent."""
    try:
        workers = live_workers()
    except RedisError:
        return 0
    return sum(announce(model, workers) for model in LanguageModel.objects.filter(enabled=True))


class Announcer:
    """A worker's announcements, from a thread of their own: the heartbeat pokes it
    after each write and goes on at once, so a slow database or channel layer never
    delays the heartbeat (a late heartbeat reads as a dead worker). Pokes that come
    while it announces make one more announcement, not one each."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            announce_model_named(self.model_name)
            connection.close_if_unusable_or_obsolete()
