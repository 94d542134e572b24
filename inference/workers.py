"""Which worker processes serve which model, and in what state: the heartbeat.

Each model worker process writes a Redis key of its own with a TTL and refreshes it
from a thread; a worker that dies stops refreshing and its key expires, so "is this
model served?" never trusts a dead process. A sorted set indexes the keys by expiry,
so reading the live workers costs one round trip (a script). The same state is
mirrored into the WorkerHeartbeat table for the Workers page and the admin.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from mixtralweb import namespace, redis_pool

from .models import WorkerHeartbeat

log = logging.getLogger(__name__)

# Drops the expired entries from the index and returns the live workers' values.
_LIVE_WORKERS_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local keys = redis.call('ZRANGE', KEYS[1], 0, -1)
if #keys == 0 then
    return {}
end
return redis.call('MGET', unpack(keys))
"""
_live_workers_script = None


def worker_key(host: str, pid: int) -> str:
    return namespace.key("worker", host, pid)


def index_key() -> str:
    """Sorted set: each worker key, scored by the time its heartbeat expires."""
    return namespace.key("workers")


def live_workers(model_name: str | None = None) -> list[dict]:
    """The workers whose heartbeat has not expired, optionally for one model."""
    global _live_workers_script
    client = redis_pool.client()
    if _live_workers_script is None:
        _live_workers_script = client.register_script(_LIVE_WORKERS_LUA)
    # EVALSHA, or EVAL once after a Redis restart (redis-py's Script does that).
    values = _live_workers_script(keys=[index_key()], args=[time.time()], client=client)
    return _parse(values, model_name)


def _parse(values, model_name: str | None = None) -> list[dict]:
    workers = []
    for raw in values:
        if raw is None:
            continue  # its key expired before its index entry
        worker = json.loads(raw)
        if model_name is None or worker["model"] == model_name:
            workers.append(worker)
    return sorted(workers, key=lambda w: (w["model"], w["host"], w["pid"]))


def serving_problem(
    model_name: str, workers: list[dict] | None = None, *, detail: bool = False
) -> str | None:
    """None when a live worker serves (or is loading) the model; otherwise why not,
    in words a user can act on. workers: the live workers, if the caller has read
    them (any model's); otherwise they are read now. detail: with the worker's own
    reason (file paths, llama.cpp's words), for staff only (the Workers page)."""
    if workers is None:
        workers = live_workers(model_name)
    workers = [w for w in workers if w["model"] == model_name]
    if any(w["state"] in WorkerHeartbeat.SERVING_STATES for w in workers):
        return None
    failed = [w for w in workers if w["state"] == WorkerHeartbeat.FAILED]
    if failed:
        if detail:
            return (
                f"The model {model_name!r} is not available: its worker failed to load "
                f"it ({failed[0]['reason']})."
            )
        return (
            f"The model {model_name!r} is not available: its worker failed to load it. "
            "An administrator sees why on the Workers page."
        )
    return (
        f"No worker is serving the model {model_name!r} right now. "
        "An administrator can start one with `manage.py modelworker "
        f"{model_name}`."
    )


def describe_device(n_gpu_layers: int, split_mode: str = "layer", main_gpu: int = 0) -> str:
    """ "cpu", or "gpu:<index>[,<index>...]": the GPUs the model's layers go to, named
    as CUDA_VISIBLE_DEVICES names them (CUDA's numbers when it is unset). split_mode
    none uses main_gpu only; layer and row use every visible GPU."""
    import llama_cpp

    from .engine import gpu_device_count

    if n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
        return "cpu"
    count = gpu_device_count()
    listed = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    listed = [v for v in listed if v]
    names = listed[:count] if len(listed) >= count else [str(i) for i in range(count)]
    if split_mode == "none":
        names = names[main_gpu : main_gpu + 1] or [str(main_gpu)]
    return f"gpu:{','.join(names) or 0}"


class Heartbeat:
    """The heartbeat of this worker process. report() changes its state at once;
    a daemon thread refreshes it every WORKER_HEARTBEAT_INTERVAL_S."""

    def __init__(self, model_name: str, device: str):
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.state = {
            "host": self.host,
            "pid": self.pid,
            "model": model_name,
            "device": device,
            "state": WorkerHeartbeat.LOADING,
            "load_progress": 0.0,
            "reason": "",
            # Running now (admitted to a sequence), and every one this process holds,
            # waiting for room included: the reaper leaves those alone.
            "generations": [],
            "held": [],
            # The engine's load and settings in force, once loaded (Workers page,
            # Prometheus): running, waiting, kv_used, kv_reserved, n_ctx,
            # n_parallel, n_threads, n_threads_batch.
            "engine": {},
            # The load options in force, from llama.cpp once loaded
            # (serving.in_force), and why a setting the environment gives is not
            # in force (registry.environment_notes): the Workers page shows both.
            "in_force": {},
            "notes": [],
            "started_at": timezone.now().isoformat(),
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_progress_write = 0.0
        # Whether the last write to Redis failed (the row says so: "unreachable").
        self._redis_unreachable = False
        # Called before each write for changes to report (the engine's load), and
        # after it (the model's status for everyone: inference/status.py).
        self.sample = None
        self.written = None
        # Set by stop() once its goodbye removed the entry: no write (the thread's,
        # or another thread's report) may put it back after that.
        self._gone = False
        self._redis_write = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    @property
    def interval_s(self) -> float:
        return settings.WORKER_HEARTBEAT_INTERVAL_S

    def start(self) -> Heartbeat:
        self.write()
        self._thread.start()
        return self

    def report(self, **changes) -> None:
        """Change the state (state=, reason=, load_progress=, ...) and write it."""
        with self._lock:
            self.state.update(changes)
        self.write()

    def report_soon(self, **changes) -> None:
        """Change the state and have the heartbeat thread write it now, without
        waiting for the write (a generation's start must not wait for it)."""
        with self._lock:
            self.state.update(changes)
        self._wake.set()

    def loading_progress(self, fraction: float) -> None:
        """For llama.cpp's load progress callback: written at most twice a second."""
        now = time.monotonic()
        if fraction < 1.0 and now - self._last_progress_write < 0.5:
            return
        self._last_progress_write = now
        self.report(load_progress=round(fraction, 3))

    def write(self) -> None:
        if self.sample is not None:
            try:
                changes = self.sample()
            except Exception:  # noqa: BLE001 - a heartbeat never takes the worker down
                log.exception("could not read the worker's state")
                changes = {}
            with self._lock:
                self.state.update(changes)
        with self._lock:
            state = dict(self.state)
        ttl = max(1, int(self.interval_s * 3))
        key = worker_key(self.host, self.pid)
        # Each store says when the other could not be reached ("unreachable"), so
        # that the ops worker's alerts learn it from the one it can still read.
        unreachable = set()
        # The row first, so that whoever sees the new state in Redis finds it
        # stored; but Redis even when the database is down: Redis is what says
        # whether the model is served. A heartbeat never takes the worker down.
        try:
            self._write_row(state)
        except Exception:  # noqa: BLE001
            unreachable.add("database")
            log.exception("could not write the worker heartbeat row")
        state["unreachable"] = sorted(unreachable)
        try:
            with self._redis_write:
                if self._gone:
                    return
                with redis_pool.client().pipeline(transaction=False) as pipe:
                    pipe.set(key, json.dumps(state), ex=ttl)
                    pipe.zadd(index_key(), {key: time.time() + ttl})
                    pipe.execute()
        except Exception:  # noqa: BLE001
            unreachable.add("redis")
            log.exception("could not write the worker heartbeat")
        redis_changed = ("redis" in unreachable) != self._redis_unreachable
        self._redis_unreachable = "redis" in unreachable
        if redis_changed and "database" not in unreachable:
            # Now, not a heartbeat later: the row was written before Redis was tried.
            try:
                self._rows().update(unreachable=["redis"] if self._redis_unreachable else [])
            except Exception:  # noqa: BLE001
                log.exception("could not write the worker heartbeat row")
        if self.written is not None and "redis" not in unreachable:
            try:
                self.written()
            except Exception:  # noqa: BLE001
                log.exception("could not announce after the heartbeat")

    def _rows(self):
        return WorkerHeartbeat.objects.filter(host=self.host, pid=self.pid)

    def _write_row(self, state: dict) -> None:
        close_old_connections()
        fields = {
            "model_name": state["model"],
            "device": state["device"],
            "state": state["state"],
            "load_progress": state["load_progress"],
            "reason": state["reason"],
            "generation_id": (state["generations"] or [None])[0],
            "unreachable": ["redis"] if self._redis_unreachable else [],
        }
        mine = self._rows()
        if not mine.update(**fields, seen_at=timezone.now()):
            WorkerHeartbeat.objects.update_or_create(
                host=self.host,
                pid=self.pid,
                defaults={**fields, "seen_at": timezone.now()},
                create_defaults={**fields, "started_at": state["started_at"]},
            )

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.report(state=WorkerHeartbeat.STOPPED, generations=[], held=[])
        key = worker_key(self.host, self.pid)
        with self._redis_write:  # after any write under way, before any later one
            self._gone = True
            with redis_pool.client().pipeline(transaction=False) as pipe:
                pipe.delete(key)
                pipe.zrem(index_key(), key)
                pipe.execute()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.write()
        connection.close()  # this thread's own connection
