"""Device telemetry: every GPU of every worker host, read every few seconds.

The main process of each model worker (`manage.py modelworker`) runs one
HostTelemetry thread, started by Celery's worker_ready signal. Each round it
- stores a GpuSample row per GPU (history; downsampled by monitoring.tasks),
- writes the latest reading of each GPU and the host's heartbeat to Redis (the
  GPU page, the alerts and /metrics read "now" from there, across processes),
- sends the readings to the channel-layer group "gpu.telemetry" (live charts).

Several workers on one host (one per GPU) would read the same GPUs: a short Redis
lock per host lets one of them sample and the others stand by.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict

import redis
from celery.signals import worker_ready, worker_shutdown
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from mixtralweb import namespace, redis_pool
from monitoring import nvml
from monitoring.models import GpuSample

log = logging.getLogger(__name__)


def gpus_key() -> str:
    """Hash: "host/index" -> the latest reading of that GPU."""
    return namespace.key("telemetry", "gpus")


def hosts_key() -> str:
    """Hash: host -> {"host", "gpus", "seen_at"}, the latest reading of each host
    ("gpus": how many GPUs NVML counts there, readable or not)."""
    return namespace.key("telemetry", "hosts")


def lock_key(host: str) -> str:
    """One sampler per host, whichever of its workers holds this."""
    return namespace.key("telemetry", "lock", host)


def _stale_after_s() -> float:
    return max(3 * settings.GPU_SAMPLE_INTERVAL_S, 15.0)


def reading_dict(reading: nvml.DeviceReading, host: str, sampled_at) -> dict:
    data = asdict(reading)
    data["processes"] = [
        {"pid": p["pid"], "used_bytes": p["used_bytes"]} for p in data["processes"]
    ]
    data.update(host=host, sampled_at=sampled_at.isoformat())
    return data


def sample_once(host: str | None = None) -> list[GpuSample]:
    """Read every GPU of this host once, store and announce the readings."""
    host = host or socket.gethostname()
    now = timezone.now()
    try:
        gpus = nvml.device_count()
        readings = nvml.read_all()  # a GPU that fails is logged and left out
    except Exception:  # noqa: BLE001 - the heartbeat still goes out
        log.exception("NVML could not list the GPUs of %s", host)
        gpus, readings = 0, []
    rows = [
        GpuSample(
            host=host,
            gpu_index=r.index,
            gpu_uuid=r.uuid,
            name=r.name,
            sampled_at=now,
            memory_used_bytes=r.memory_used_bytes,
            memory_total_bytes=r.memory_total_bytes,
            utilization_pct=r.utilization_pct,
            temperature_c=r.temperature_c,
            power_w=r.power_w,
            power_limit_w=r.power_limit_w,
            sm_clock_mhz=r.sm_clock_mhz,
            mem_clock_mhz=r.mem_clock_mhz,
            throttle_reasons=r.throttle_reasons,
            ecc_errors=r.ecc_errors,
            processes=[{"pid": p.pid, "used_bytes": p.used_bytes} for p in r.processes],
        )
        for r in readings
    ]
    if rows:
        GpuSample.objects.bulk_create(rows)
    latest = [reading_dict(r, host, now) for r in readings]
    client = redis_pool.client()
    pipe = client.pipeline()
    pipe.hset(
        hosts_key(),
        host,
        json.dumps({"host": host, "gpus": gpus, "seen_at": now.isoformat()}),
    )
    for data in latest:
        pipe.hset(gpus_key(), f"{host}/{data['index']}", json.dumps(data))
    pipe.execute()
    return rows


def _fresh(items: list[dict], field: str) -> list[dict]:
    cutoff = timezone.now().timestamp() - _stale_after_s()
    return [i for i in items if parse_datetime(i[field]).timestamp() >= cutoff]


def current_hosts() -> list[dict]:
    """Worker hosts heard from recently, each with its number of GPUs (0: none)."""
    values = [json.loads(v) for v in redis_pool.client().hvals(hosts_key())]
    return sorted(_fresh(values, "seen_at"), key=lambda h: h["host"])


def current_gpus() -> list[dict]:
    """The latest reading of every GPU heard from recently, as dicts."""
    values = [json.loads(v) for v in redis_pool.client().hvals(gpus_key())]
    return sorted(_fresh(values, "sampled_at"), key=lambda g: (g["host"], g["index"]))


class HostTelemetry:
    """The sampling thread of one worker process."""

    def __init__(self, interval_s: float | None = None, host: str | None = None):
        self.interval_s = interval_s or settings.GPU_SAMPLE_INTERVAL_S
        self.host = host or socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{id(self)}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-telemetry", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> HostTelemetry:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _holds_host_lock(self, client: redis.Redis) -> bool:
        key = lock_key(self.host)
        ttl = int(self.interval_s * 3) + 1
        if client.set(key, self.owner, nx=True, ex=ttl):
            return True
        if client.get(key) == self.owner.encode():
            client.expire(key, ttl)
            return True
        return False

    def _announce(self, rows: list[GpuSample]) -> None:
        if not rows:
            return
        message = {
            "type": "gpu.samples",
            "host": self.host,
            "samples": [
                {
                    "index": s.gpu_index,
                    "name": s.name,
                    "t": s.sampled_at.isoformat(),
                    "memory_used_bytes": s.memory_used_bytes,
                    "memory_total_bytes": s.memory_total_bytes,
                    "utilization_pct": s.utilization_pct,
                    "temperature_c": s.temperature_c,
                    "power_w": s.power_w,
                }
                for s in rows
            ],
        }
        self._loop.run_until_complete(
            get_channel_layer().group_send(namespace.telemetry_group(), message)
        )

    def _run(self) -> None:
        # One event loop for the thread's whole life: the channel layer keeps its
        # Redis connections per loop.
        self._loop = asyncio.new_event_loop()
        client = redis_pool.client()
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                if self._holds_host_lock(client):
                    close_old_connections()
                    self._announce(sample_once(self.host))
            except Exception:  # noqa: BLE001 - telemetry must never stop the worker
                log.exception("GPU telemetry round failed")
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - began)))
        self._loop.close()
        connection.close()  # this thread's own database connection


_running: HostTelemetry | None = None


@worker_ready.connect
def _start_with_model_worker(**_kwargs) -> None:
    """Model workers (started by `manage.py modelworker`) sample their host's GPUs."""
    global _running
    if os.environ.get("WORKER_MODEL") and _running is None:
        _running = HostTelemetry().start()
        log.info("GPU telemetry every %ss (%s)", _running.interval_s, _gpu_summary())


@worker_shutdown.connect
def _stop_with_worker(**_kwargs) -> None:
    global _running
    if _running is not None:
        _running.stop()
        _running = None


def _gpu_summary() -> str:
    count = nvml.device_count()
    return f"{count} GPU(s)" if count else nvml.NO_GPU_MESSAGE
