"""Which worker processes serve which model, and in what state: the heartbeat.

Each model worker process writes a Redis key `worker:<host>:<pid>` with a TTL and
refreshes it from a thread; a worker that dies stops refreshing and its key expires,
so "is this model served?" never trusts a dead process. A sorted set indexes the
keys by expiry, so that reading the live workers (on every chat message) costs one
round trip (a script) however many other keys Redis holds. The same state is
mirrored into the WorkerHeartbeat table for the workers page and the admin.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import close_old_connections, connection
from django.shortcuts import render
from django.utils import timezone

from mixtralweb import redis_pool

from .models import LanguageModel, WorkerHeartbeat

log = logging.getLogger(__name__)

KEY_PREFIX = "worker:"
# Sorted set: each worker key, scored by the time its heartbeat expires.
INDEX_KEY = "workers:live"

# Drops the expired entries from the index and returns the live workers' values, in
# one round trip (it runs on every chat message, on the way to the first token).
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
    return f"{KEY_PREFIX}{host}:{pid}"


def live_workers(model_name: str | None = None) -> list[dict]:
    """The workers whose heartbeat has not expired, optionally for one model."""
    global _live_workers_script
    client = redis_pool.client()
    if _live_workers_script is None:
        _live_workers_script = client.register_script(_LIVE_WORKERS_LUA)
    # EVALSHA, or EVAL once after a Redis restart (redis-py's Script does that).
    values = _live_workers_script(keys=[INDEX_KEY], args=[time.time()], client=client)
    return parse_live_workers(values, model_name)


def queue_live_workers(pipeline) -> None:
    """Add the live-workers read to a Redis pipeline (sync or asyncio) that the caller
    executes; its reply goes to parse_live_workers. (EVAL, not a registered script: a
    pipeline would ask Redis whether the script exists first, a round trip more.)"""
    pipeline.eval(_LIVE_WORKERS_LUA, 1, INDEX_KEY, time.time())


def parse_live_workers(values, model_name: str | None = None) -> list[dict]:
    workers = []
    for raw in values:
        if raw is None:
            continue  # its key expired before its index entry
        worker = json.loads(raw)
        if model_name is None or worker["model"] == model_name:
            workers.append(worker)
    return sorted(workers, key=lambda w: (w["model"], w["host"], w["pid"]))


def serving_problem(model_name: str, workers: list[dict] | None = None) -> str | None:
    """None when a live worker serves (or is loading) the model; otherwise why not,
    in words a user can act on. workers: the live workers, if the caller has read
    them (any model's); otherwise they are read now."""
    if workers is None:
        workers = live_workers(model_name)
    workers = [w for w in workers if w["model"] == model_name]
    if any(w["state"] in WorkerHeartbeat.SERVING_STATES for w in workers):
        return None
    failed = [w for w in workers if w["state"] == WorkerHeartbeat.FAILED]
    if failed:
        return (
            f"The model {model_name!r} is not available: its worker failed to load it "
            f"({failed[0]['reason']})."
        )
    return (
        f"No worker is serving the model {model_name!r} right now. "
        "An administrator can start one with `manage.py modelworker "
        f"{model_name}`."
    )


def describe_device(n_gpu_layers: int) -> str:
    """ "cpu", or "gpu:<index>" as CUDA numbers the first visible device."""
    import llama_cpp

    if n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return f"gpu:{visible or 0}"


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
            "generation": None,
            "started_at": timezone.now().isoformat(),
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_progress_write = 0.0
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    @property
    def interval_s(self) -> float:
        return settings.WORKER_HEARTBEAT_INTERVAL_S

    def start(self) -> Heartbeat:
        self.write()
        self._thread.start()
        return self

    def report(self, **changes) -> None:
        """Change the state (state=, reason=, load_progress=, generation=) and write it."""
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
        with self._lock:
            state = dict(self.state)
        ttl = max(1, int(self.interval_s * 3))
        key = worker_key(self.host, self.pid)
        # The row first, so that whoever sees the new state in Redis finds it
        # stored; but Redis even when the database is down: Redis is what says
        # whether the model is served. A heartbeat never takes the worker down.
        try:
            self._write_row(state)
        except Exception:  # noqa: BLE001
            log.exception("could not write the worker heartbeat row")
        try:
            with redis_pool.client().pipeline(transaction=False) as pipe:
                pipe.set(key, json.dumps(state), ex=ttl)
                pipe.zadd(INDEX_KEY, {key: time.time() + ttl})
                pipe.execute()
        except Exception:  # noqa: BLE001
            log.exception("could not write the worker heartbeat")

    def _write_row(self, state: dict) -> None:
        close_old_connections()
        fields = {
            "model_name": state["model"],
            "device": state["device"],
            "state": state["state"],
            "load_progress": state["load_progress"],
            "reason": state["reason"],
            "generation_id": state["generation"],
        }
        # One UPDATE once the row exists: update_or_create's transaction (BEGIN,
        # SELECT FOR UPDATE, UPDATE, COMMIT) ran as each answer's prompt was being
        # evaluated, on the same cores.
        mine = WorkerHeartbeat.objects.filter(host=self.host, pid=self.pid)
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
        self.report(state=WorkerHeartbeat.STOPPED, generation=None)
        key = worker_key(self.host, self.pid)
        with redis_pool.client().pipeline(transaction=False) as pipe:
            pipe.delete(key)
            pipe.zrem(INDEX_KEY, key)
            pipe.execute()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.write()
        connection.close()  # this thread's own connection


@login_required
def workers_page(request):
    """/workers/: every model, whether a worker serves it, and each worker's state."""
    live = live_workers()
    live_ids = {(w["host"], w["pid"]) for w in live}
    gone = [
        row
        for row in WorkerHeartbeat.objects.filter(
            seen_at__gte=timezone.now() - timedelta(days=1)
        ).order_by("-seen_at")[:50]
        if (row.host, row.pid) not in live_ids
    ]
    models = [
        {"model": model, "problem": serving_problem(model.name)}
        for model in LanguageModel.objects.filter(enabled=True)
    ]
    return render(
        request,
        "inference/workers.html",
        {"live": live, "gone": gone, "models": models},
    )
