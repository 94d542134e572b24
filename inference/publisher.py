"""Carries a generation's text from the decode loop to the channel layer.

The decode loop calls put() and returns at once; a thread with its own event loop
sends whatever accumulated while the previous send was in flight, so tokens are
coalesced only as much as Redis makes them wait. The same thread appends the text
to a short-lived Redis key (the live text a reconnecting client starts from) and
polls the stop flag that the web process sets.
"""

from __future__ import annotations

import asyncio
import threading
import time

import redis.asyncio as aioredis
from channels.layers import get_channel_layer
from django.conf import settings

LIVE_TEXT_TTL_S = 3600
CANCEL_POLL_S = 0.02


def live_text_key(generation_id: int) -> str:
    return f"gen:{generation_id}:live"


def cancel_key(generation_id: int) -> str:
    return f"gen:{generation_id}:cancel"


def alive_key(generation_id: int) -> str:
    """Present while a worker is running the generation (prompt evaluation included)."""
    return f"gen:{generation_id}:alive"


ALIVE_TTL_S = 30
ALIVE_REFRESH_S = 5


def group_name(generation_id: int) -> str:
    return f"gen.{generation_id}"


class Publisher:
    """Streams one generation: pieces of text in order, then one final event."""

    def __init__(self, generation_id: int, cancel: threading.Event, start_offset: int = 0):
        self.generation_id = generation_id
        self.group = group_name(generation_id)
        self.cancel = cancel
        self.sent_chars = start_offset
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete,
            args=(self._main(),),
            name=f"publisher-{generation_id}",
            daemon=True,
        )
        self.error: BaseException | None = None

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def put(self, text: str) -> None:
        """Queue a piece of text. Never blocks."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, ("text", text, time.time()))

    def event(self, message: dict) -> None:
        """Queue an event for the group, after the text queued before it."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, ("event", message, None))

    def close(self, final: dict | None = None, timeout_s: float = 10.0) -> None:
        """Send what is queued, then `final`, then stop the thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, ("close", final, None))
        self._thread.join(timeout_s)

    async def _main(self) -> None:
        layer = get_channel_layer()
        redis = aioredis.from_url(settings.REDIS_URL, **settings.REDIS_ASYNC_OPTIONS)
        watcher = asyncio.ensure_future(self._watch_cancel(redis))
        try:
            while True:
                batch = [await self._queue.get()]
                while not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                closing = await self._send(layer, redis, batch)
                if closing:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported to the task, never raised there
            self.error = exc
        finally:
            watcher.cancel()
            await redis.delete(alive_key(self.generation_id))
            await redis.aclose()

    async def _send(self, layer, redis, batch: list[tuple]) -> bool:
        texts: list[str] = []
        produced_at: list[float] = []

        async def flush_texts() -> None:
            if not texts:
                return
            text = "".join(texts)
            key = live_text_key(self.generation_id)
            await redis.append(key, text.encode("utf-8"))
            await redis.expire(key, LIVE_TEXT_TTL_S)
            await layer.group_send(
                self.group,
                {
                    "type": "generation.token",
                    "generation": self.generation_id,
                    "offset": self.sent_chars,
                    "text": text,
                    "produced_at": produced_at[:],
                },
            )
            self.sent_chars += len(text)
            texts.clear()
            produced_at.clear()

        for kind, payload, at in batch:
            if kind == "text":
                texts.append(payload)
                produced_at.append(at)
                continue
            await flush_texts()
            if payload is not None:
                await layer.group_send(self.group, payload)
            if kind == "close":
                return True
        await flush_texts()
        return False

    async def _watch_cancel(self, redis) -> None:
        """Poll the stop flag, and keep the alive key fresh for the reaper."""
        key = cancel_key(self.generation_id)
        alive = alive_key(self.generation_id)
        next_alive = 0.0
        while True:
            now = time.monotonic()
            if now >= next_alive:
                await redis.set(alive, "1", ex=ALIVE_TTL_S)
                next_alive = now + ALIVE_REFRESH_S
            if not self.cancel.is_set() and await redis.exists(key):
                self.cancel.set()
            await asyncio.sleep(CANCEL_POLL_S)
