"""Streams generations from a worker process to the browsers, and carries stop
requests back.

A worker process runs one asyncio loop in a daemon thread, with channels_redis's
channel layer and a Redis client. Each generation's task thread talks to it through
a GenerationStream, whose methods return at once: the engine's events are never
held up by Redis.

Text is coalesced: a piece that arrives less than STREAM_COALESCE_MS after the last
send waits and goes out with the pieces after it; events and the final event go out
at once, after the text queued before them. Each send first appends the text to the
generation's live-text key, which a reconnecting client starts from, so a snapshot
is never behind a frame the client then receives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from redis.exceptions import RedisError

from mixtralweb import namespace, redis_pool

log = logging.getLogger(__name__)

LIVE_TEXT_TTL_S = 3600
STOP_TTL_S = 3600
ALIVE_TTL_S = 30
ALIVE_REFRESH_S = 5


class StreamLoop:
    """The process's stream thread: one event loop, its channel layer and Redis."""

    _instance: StreamLoop | None = None
    _lock = threading.Lock()

    def __init__(self):
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.layer = get_channel_layer()
        self.redis = None
        threading.Thread(target=self.loop.run_forever, name="streams", daemon=True).start()

    @classmethod
    def get(cls) -> StreamLoop:
        with cls._lock:
            # A forked child inherits the object but not the thread: start its own.
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def client(self):
        """The loop's Redis client (call in the loop)."""
        if self.redis is None:
            self.redis = redis_pool.async_client()
        return self.redis

    def submit(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)


class GenerationStream:
    """One generation's way out (text, events, the final event) and in (stop)."""

    def __init__(self, generation, *, text_before: str = ""):
        """text_before: the answer's text before this run (a retry on another worker,
        or a continuation): frames start at its end, and the live text starts with it."""
        self.generation_id = generation.pk
        self.group = namespace.generation_group(generation.pk)
        self.live_key = namespace.live_text_key(generation.pk, generation.queued_at)
        self.stop_key = namespace.stop_key(generation.pk, generation.queued_at)
        self.alive_key = namespace.alive_key(generation.pk, generation.queued_at)
        self.sent_chars = len(text_before)
        self._live_seed: str | None = text_before or None
        self.coalesce_s = settings.STREAM_COALESCE_MS / 1000
        self._streams = StreamLoop.get()
        # Used only in the stream thread (items go in by call_soon_threadsafe).
        self._queue: asyncio.Queue = asyncio.Queue()
        self._sender: concurrent.futures.Future | None = None
        self._watcher: concurrent.futures.Future | None = None

    # --- from the task thread; none of these waits on Redis ----------------------------
    def watch_for_stop(self, on_stop: Callable[[], None]) -> None:
        """Call on_stop (in the stream thread) when a stop is requested, including one
        requested before now; meanwhile keep the alive key fresh for the reapers."""
        if self._watcher is None:
            self._watcher = self._streams.submit(self._watch(on_stop))

    def open(self) -> None:
        """Start sending (the generation has started)."""
        if self._sender is None:
            self._sender = self._streams.submit(self._send_all())

    def put(self, text: str) -> None:
        self._feed(("text", (text, time.time())))

    def event(self, message: dict) -> None:
        self._feed(("event", message))

    def close(self, final: dict | None, timeout_s: float = 10.0) -> None:
        """Send what is queued, then `final`; wait at most timeout_s for it to go.
        The final event is sent even if the stream was never opened."""
        self.open()
        self._feed(("close", final))
        try:
            error = self._sender.result(timeout_s)
        except concurrent.futures.TimeoutError:
            error = f"the stream did not finish in {timeout_s} s"
        if error:
            # The database holds the answer: a reload shows it.
            log.warning("generation %s: streaming failed: %s", self.generation_id, error)
        if self._watcher is not None:
            self._watcher.cancel()
        self._streams.submit(self._forget())

    def _feed(self, item: tuple) -> None:
        self._streams.loop.call_soon_threadsafe(self._queue.put_nowait, item)

    # --- in the stream thread -----------------------------------------------------------
    async def _watch(self, on_stop: Callable[[], None]) -> None:
        redis = self._streams.client()
        stopped = False
        while True:
            try:
                await redis.set(self.alive_key, "1", ex=ALIVE_TTL_S)
                if stopped:
                    await asyncio.sleep(ALIVE_REFRESH_S)
                elif await redis.blpop([self.stop_key], timeout=ALIVE_REFRESH_S):
                    stopped = True
                    on_stop()
            except RedisError:
                # Redis is restarting and the client's own retries gave up: try again
                # shortly (the generation goes on meanwhile).
                await asyncio.sleep(0.5)

    async def _forget(self) -> None:
        try:
            await self._streams.client().delete(self.alive_key, self.stop_key)
        except RedisError:
            pass  # they expire by themselves

    async def _send_all(self) -> str | None:
        """Send until the close has been sent. Returns None, or what went wrong (the
        rest is then dropped up to the close)."""
        loop = asyncio.get_running_loop()
        last_send = float("-inf")
        error = None
        while True:
            items = [await self._queue.get()]
            wait = last_send + self.coalesce_s - loop.time()
            if items[0][0] == "text" and wait > 0:
                await asyncio.sleep(wait)
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            closing = any(kind == "close" for kind, _ in items)
            if error is None:
                try:
                    await self._send(items)
                except Exception as exc:  # noqa: BLE001 - reported to the task thread
                    error = f"{type(exc).__name__}: {exc}"
            last_send = loop.time()
            if closing:
                return error

    async def _send(self, items: list[tuple]) -> None:
        texts: list[str] = []
        produced_at: list[float] = []

        async def flush_texts() -> None:
            if not texts:
                return
            text = "".join(texts)
            times = produced_at[:]
            texts.clear()
            produced_at.clear()
            redis = self._streams.client()
            async with redis.pipeline(transaction=False) as pipe:
                if self._live_seed is not None:
                    # Unless the key already holds it (a retry: the text seen so far).
                    pipe.setnx(self.live_key, self._live_seed.encode("utf-8"))
                    self._live_seed = None
                pipe.append(self.live_key, text.encode("utf-8"))
                pipe.expire(self.live_key, LIVE_TEXT_TTL_S)
                await pipe.execute()
            message = {
                "type": "generation.token",
                "generation": self.generation_id,
                "offset": self.sent_chars,
                "text": text,
                "produced_at": times,  # when the worker had each piece (wall clock)
            }
            await self._streams.layer.group_send(self.group, message)
            self.sent_chars += len(text)

        for kind, payload in items:
            if kind == "text":
                texts.append(payload[0])
                produced_at.append(payload[1])
                continue
            await flush_texts()
            if payload is not None:
                await self._streams.layer.group_send(self.group, payload)
        await flush_texts()


def request_stop(generation) -> None:
    """Ask the worker that holds (or will hold) the generation to stop it."""
    key = namespace.stop_key(generation.pk, generation.queued_at)
    with redis_pool.client().pipeline(transaction=False) as pipe:
        pipe.rpush(key, 1)
        pipe.expire(key, STOP_TTL_S)
        pipe.execute()


def live_text(generation) -> str | None:
    """What has been streamed of the generation so far, if Redis has it."""
    raw = redis_pool.client().get(namespace.live_text_key(generation.pk, generation.queued_at))
    return raw.decode("utf-8", "replace") if raw is not None else None


def is_alive(generation) -> bool:
    """Whether a worker holds the generation now (its stop watcher keeps this key)."""
    return bool(
        redis_pool.client().exists(namespace.alive_key(generation.pk, generation.queued_at))
    )


def forget_alive(generation) -> None:
    redis_pool.client().delete(namespace.alive_key(generation.pk, generation.queued_at))


def forget_live_text(generation) -> None:
    redis_pool.client().delete(namespace.live_text_key(generation.pk, generation.queued_at))


def announce(group: str, message: dict) -> None:
    """Send one message to a group from synchronous code (a view, a task)."""
    async_to_sync(get_channel_layer().group_send)(group, message)
