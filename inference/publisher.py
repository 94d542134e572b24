"""Carries a generation's text from the decode loop to the channel layer.

The decode loop calls put() and returns at once; a thread with its own event loop
sends the text to the channel layer. A token that arrives while the previous send
was in flight, or less than `coalesce_s` after it, waits and goes out with the
tokens that follow it (events and the close go out at once). Sending every token
on its own costs the decode loop about 14 % of its speed (the sends hold the GIL;
docs/benchmarks.md); a few tens of milliseconds of coalescing bring that near zero
and stay well inside the stream-lag budget. The same thread appends the text to a
short-lived Redis key (the live text a reconnecting client starts from) and waits,
blocked in Redis (BLPOP) rather than polling, for the stop request that the web
process pushes: a stop reaches the decode loop at once, and costs nothing until then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time

import redis.asyncio as aioredis
from channels.layers import get_channel_layer
from django.conf import settings
from redis.exceptions import RedisError

LIVE_TEXT_TTL_S = 3600
STOP_TTL_S = 3600


def live_text_key(generation_id: int) -> str:
    return f"gen:{generation_id}:live"


def cancel_key(generation_id: int) -> str:
    """A list: one element per stop request. It outlives a generation that has not
    started yet, so a worker that starts later still sees it."""
    return f"gen:{generation_id}:cancel"


def queue_stop_request(pipeline, generation_id: int) -> None:
    """Add the commands that ask the worker to stop to a Redis pipeline (sync or
    asyncio); the caller executes it."""
    key = cancel_key(generation_id)
    pipeline.rpush(key, 1)
    pipeline.expire(key, STOP_TTL_S)


def alive_key(generation_id: int) -> str:
    """Present while a worker is running the generation (prompt evaluation included)."""
    return f"gen:{generation_id}:alive"


ALIVE_TTL_S = 30
ALIVE_REFRESH_S = 5


def group_name(generation_id: int) -> str:
    return f"gen.{generation_id}"


class _LoopThread:
    """One event loop per process, in a daemon thread, shared by every Publisher:
    the channel layer's and Redis's connection pools (bound to a loop) then last
    from one generation to the next instead of being opened for each."""

    _instance: _LoopThread | None = None
    _lock = threading.Lock()

    def __init__(self):
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.redis: aioredis.Redis | None = None
        threading.Thread(target=self.loop.run_forever, name="publisher-loop", daemon=True).start()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            # A forked child inherits the object but not the thread: start its own.
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def client(self) -> aioredis.Redis:
        """The loop's Redis client (call in the loop). Its pool lends the stop
        watcher's BLPOP a connection of its own."""
        if self.redis is None:
            self.redis = aioredis.from_url(settings.REDIS_URL, **settings.REDIS_ASYNC_OPTIONS)
        return self.redis


class Publisher:
    """Streams one generation: pieces of text in order, then one final event."""

    def __init__(
        self,
        generation_id: int,
        cancel: threading.Event,
        start_offset: int = 0,
        coalesce_s: float | None = None,
    ):
        self.generation_id = generation_id
        self.group = group_name(generation_id)
        self.cancel = cancel
        self.sent_chars = start_offset
        if coalesce_s is None:
            coalesce_s = settings.STREAM_COALESCE_MS / 1000
        self.coalesce_s = coalesce_s
        self._loop_thread = _LoopThread.get()
        self._loop = self._loop_thread.loop
        self._queue: asyncio.Queue = asyncio.Queue()
        # Set when an event or the close is queued: it ends a coalescing wait.
        self._urgent = asyncio.Event()
        self._done: concurrent.futures.Future | None = None
        self.error: BaseException | None = None

    def start(self) -> Publisher:
        self._done = asyncio.run_coroutine_threadsafe(self._main(), self._loop)
        return self

    def put(self, text: str) -> None:
        """Queue a piece of text. Never blocks."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, ("text", text, time.time()))

    def event(self, message: dict) -> None:
        """Queue an event for the group, after the text queued before it."""
        self._loop.call_soon_threadsafe(self._put_urgent, ("event", message, None))

    def close(self, final: dict | None = None, timeout_s: float = 10.0) -> None:
        """Send what is queued, then `final`, then stop the thread."""
        self._loop.call_soon_threadsafe(self._put_urgent, ("close", final, None))
        try:
            self._done.result(timeout_s)
        except concurrent.futures.TimeoutError:
            self.error = TimeoutError(f"the publisher did not finish in {timeout_s} s")

    def _put_urgent(self, item: tuple) -> None:
        self._queue.put_nowait(item)
        self._urgent.set()

    async def _main(self) -> None:
        layer = get_channel_layer()
        redis = self._loop_thread.client()
        watcher = asyncio.ensure_future(self._watch_cancel(redis))
        last_send = float("-inf")
        try:
            while True:
                batch = [await self._queue.get()]
                wait = last_send + self.coalesce_s - self._loop.time()
                if batch[0][0] == "text" and wait > 0 and not self._urgent.is_set():
                    try:
                        await asyncio.wait_for(self._urgent.wait(), wait)
                    except TimeoutError:
                        pass
                self._urgent.clear()
                while not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                closing = await self._send(layer, redis, batch)
                last_send = self._loop.time()
                if closing:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported to the task, never raised there
            self.error = exc
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            try:
                await redis.delete(alive_key(self.generation_id))
            except RedisError:
                pass  # it expires by itself

    async def _send(self, layer, redis, batch: list[tuple]) -> bool:
        texts: list[str] = []
        produced_at: list[float] = []

        async def flush_texts() -> None:
            if not texts:
                return
            text = "".join(texts)
            key = live_text_key(self.generation_id)
            async with redis.pipeline(transaction=False) as pipe:
                await pipe.append(key, text.encode("utf-8")).expire(key, LIVE_TEXT_TTL_S).execute()
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
        """Wait for a stop request, and keep the alive key fresh for the reaper.
        (BLPOP holds a connection of the client's pool while it waits.)"""
        key = cancel_key(self.generation_id)
        alive = alive_key(self.generation_id)
        while True:
            try:
                await redis.set(alive, "1", ex=ALIVE_TTL_S)
                if self.cancel.is_set():
                    await asyncio.sleep(ALIVE_REFRESH_S)
                elif await redis.blpop([key], timeout=ALIVE_REFRESH_S):
                    self.cancel.set()
            except RedisError:
                # Redis is restarting and the client's own retries gave up: try again
                # shortly (the generation goes on meanwhile).
                await asyncio.sleep(0.5)
