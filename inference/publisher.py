"""Carries a generation's text from the decode loop to the channel layer.

The decode loop calls put() and returns at once: the text goes down a pipe to the
worker process's stream relay (inference/relay.py), a helper process that
coalesces it and sends it to the channel layer (inference/streams.py). Sending
from a thread of the decoding process instead cost the decode loop about 10 % of
its speed, even coalesced (the sends' Python competes with the loop's for the
GIL); the same sends from another process cost it nothing (docs/benchmarks.md).

A thread of this process waits, blocked in Redis (BLPOP) rather than polling, for
the stop request that the web process pushes, and keeps the generation's alive key
fresh for the reaper: a stop reaches the decode loop at once, and costs nothing
until then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import threading
import time

import redis.asyncio as aioredis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from redis.exceptions import RedisError

from mixtralweb import redis_pool

log = logging.getLogger(__name__)

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
    """One event loop per process, in a daemon thread, for the stop watchers: its
    Redis pool lasts from one generation to the next."""

    _instance: _LoopThread | None = None
    _lock = threading.Lock()

    def __init__(self):
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.redis: aioredis.Redis | None = None
        threading.Thread(target=self.loop.run_forever, name="stop-watch", daemon=True).start()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            # A forked child inherits the object but not the thread: start its own.
            if cls._instance is None or cls._instance.pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    def client(self) -> aioredis.Redis:
        """The loop's Redis client (call in the loop). Its pool lends each BLPOP a
        connection of its own."""
        if self.redis is None:
            self.redis = redis_pool.async_client()
        return self.redis


class RelayClient:
    """This process's stream relay (inference/relay.py), started on first use and
    again if it has died; one JSON line per operation down its stdin, one line back
    per closed generation."""

    _instance: RelayClient | None = None
    _lock = threading.Lock()

    def __init__(self):
        self.pid = os.getpid()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "inference.relay"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=settings.BASE_DIR,
            env=os.environ.copy(),
        )
        self._write_lock = threading.Lock()
        self._waiting: dict[int, tuple[threading.Event, list]] = {}
        threading.Thread(target=self._read, name="relay-reader", daemon=True).start()

    @classmethod
    def get(cls) -> RelayClient:
        with cls._lock:
            relay = cls._instance
            if relay is None or relay.pid != os.getpid() or relay.process.poll() is not None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def stop(cls, timeout_s: float = 10) -> None:
        with cls._lock:
            relay, cls._instance = cls._instance, None
        if relay is not None and relay.pid == os.getpid():
            try:
                relay.process.stdin.close()  # the relay finishes what it has, then exits
                relay.process.wait(timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                relay.process.kill()

    def expect_close(self, generation_id: int) -> tuple[threading.Event, list]:
        waiter = (threading.Event(), [])
        self._waiting[generation_id] = waiter
        return waiter

    def send(self, message: dict) -> None:
        """Raises OSError if the relay has gone."""
        data = json.dumps(message).encode() + b"\n"
        with self._write_lock:
            self.process.stdin.write(data)
            self.process.stdin.flush()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "closed" in message:
                waiter = self._waiting.pop(message["closed"], None)
                if waiter is not None:
                    waiter[1].append(message.get("error"))
                    waiter[0].set()
        for event, result in list(self._waiting.values()):  # the relay has gone
            result.append("the stream relay exited")
            event.set()


class Publisher:
    """Streams one generation: pieces of text in order, then one final event.

    Writes to the process's relay and returns at once. If the relay has gone, the
    rest of the text is not streamed (the worker still saves all of it) and the
    final event is sent from here, so that every client still learns the end."""

    def __init__(
        self,
        generation_id: int,
        cancel: threading.Event,
        start_offset: int = 0,
        coalesce_s: float | None = None,
    ):
        self.generation_id = generation_id
        self.cancel = cancel
        self.start_offset = start_offset
        self.coalesce_s = coalesce_s
        self.error: str | None = None
        self._relay: RelayClient | None = None
        self._closed: tuple[threading.Event, list] | None = None
        self._watcher: concurrent.futures.Future | None = None

    def start(self) -> Publisher:
        self._relay = RelayClient.get()
        self._closed = self._relay.expect_close(self.generation_id)
        self._write(
            {
                "op": "open",
                "gen": self.generation_id,
                "offset": self.start_offset,
                "coalesce_s": self.coalesce_s,
            }
        )
        return self

    def watch_for_stop(self) -> None:
        """Start waiting for a stop request (and keeping the alive key fresh). The
        caller starts it just before the model runs: the watcher's Python and its
        Redis commands would otherwise compete with the way to the first token. A
        stop requested earlier waits in Redis and is seen at once."""
        if self._watcher is None:
            watch = _LoopThread.get()
            self._watcher = asyncio.run_coroutine_threadsafe(self._watch_cancel(watch), watch.loop)

    def put(self, text: str) -> None:
        """Queue a piece of text. Never blocks on Redis."""
        self._write({"op": "text", "gen": self.generation_id, "text": text, "at": time.time()})

    def event(self, message: dict) -> None:
        """Queue an event for the group, after the text queued before it."""
        self._write({"op": "event", "gen": self.generation_id, "event": message})

    def close(self, final: dict | None = None, timeout_s: float = 10.0) -> None:
        """Send what is queued, then `final`; wait (at most timeout_s) until it is sent."""
        delivered = self._write({"op": "close", "gen": self.generation_id, "final": final})
        if delivered:
            event, result = self._closed
            if not event.wait(timeout_s):
                self.error = f"the stream relay did not finish in {timeout_s} s"
            elif result and result[0]:
                self.error = result[0]
        if self.error:
            log.warning("generation %s: streaming failed: %s", self.generation_id, self.error)
            if final is not None:
                try:
                    async_to_sync(get_channel_layer().group_send)(
                        group_name(self.generation_id), final
                    )
                except Exception:  # noqa: BLE001 - the row is final; a reload shows it
                    log.exception("generation %s: the final event was not sent", self.generation_id)
        if self._watcher is not None:
            self._watcher.cancel()
        try:
            redis_pool.client().delete(alive_key(self.generation_id))
        except RedisError:
            pass  # it expires by itself

    def _write(self, message: dict) -> bool:
        if self.error is not None:
            return False
        try:
            self._relay.send(message)
            return True
        except (OSError, ValueError) as exc:  # BrokenPipe; ValueError: the pipe is closed
            self.error = f"the stream relay has gone ({exc})"
            return False

    async def _watch_cancel(self, watch: _LoopThread) -> None:
        """Wait for a stop request, and keep the alive key fresh for the reaper.
        (BLPOP holds a connection of the client's pool while it waits.)"""
        redis = watch.client()
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
