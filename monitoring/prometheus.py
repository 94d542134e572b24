"""Prometheus metrics: every metric name lives here.

Correct across processes: nothing is counted in a process's memory. A worker that
finishes a generation adds its figures to Redis hashes (counters and histogram
buckets), once per generation; whichever web process answers the scrape reads
those hashes, counts queued and running generations in the database and reads the
latest GPU readings that the telemetry threads left in Redis (a custom collector).
So any number of web and worker processes, on any number of hosts, report one
consistent set of series.

Names follow vLLM (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`...)
with our own prefix.
"""

from __future__ import annotations

from django.db.models import Count
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest

from inference.models import Generation
from inference.workers import live_workers
from mixtralweb import namespace, redis_pool
from monitoring.models import RequestMetrics

PREFIX = "workbench:"
SEEN_TTL_S = 7 * 24 * 3600

# name -> (help, bucket upper bounds in seconds); the buckets are vLLM's.
HISTOGRAMS = {
    "time_to_first_token_seconds": (
        "Time from queued to the first token.",
        [
            0.01,
            0.025,
            0.05,
            0.1,
            0.25,
            0.5,
            0.75,
            1.0,
            2.5,
            5.0,
            7.5,
            10.0,
            20.0,
            40.0,
            80.0,
            160.0,
            640.0,
        ],
    ),
    "inter_token_latency_seconds": (
        "Time between output tokens (each request's mean, once per token).",
        [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5],
    ),
    "request_queue_time_seconds": (
        "Time a request waited in the queue.",
        [0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0],
    ),
    "e2e_request_latency_seconds": (
        "Time from queued to finished.",
        [
            0.3,
            0.5,
            0.8,
            1.0,
            1.5,
            2.0,
            2.5,
            5.0,
            10.0,
            15.0,
            20.0,
            30.0,
            60.0,
            120.0,
            240.0,
            480.0,
            960.0,
            1920.0,
        ],
    ),
}
COUNTERS = {
    "prompt_tokens": "Prompt tokens processed (cached ones included).",
    "generation_tokens": "Tokens generated.",
}


def _models_key() -> str:
    return namespace.key("prom", "models")


def _counters_key(model: str) -> str:
    return namespace.key("prom", model, "counters")


def _histogram_key(model: str, name: str) -> str:
    return namespace.key("prom", model, "hist", name)


def _observe(pipe, model: str, name: str, value: float, times: int = 1) -> None:
    bounds = HISTOGRAMS[name][1]
    bucket = next((i for i, upper in enumerate(bounds) if value <= upper), len(bounds))
    key = _histogram_key(model, name)
    pipe.hincrby(key, str(bucket), times)
    pipe.hincrby(key, "count", times)
    pipe.hincrbyfloat(key, "sum", value * times)


def observe(generation: Generation) -> bool:
    """Add a finished generation to the shared counters. Once per generation: a
    second call (a redelivered signal) changes nothing and returns False."""
    client = redis_pool.client()
    # The id alone could repeat if the database were recreated beside the same Redis.
    seen = namespace.key("prom", "seen", generation.pk, generation.queued_at.timestamp())
    if not client.set(seen, 1, nx=True, ex=SEEN_TTL_S):
        return False
    model = generation.model.name
    metrics = RequestMetrics.objects.filter(generation_id=generation.pk).first()
    pipe = client.pipeline()
    pipe.sadd(_models_key(), model)
    pipe.hincrby(_counters_key(model), f"finished:{generation.state}", 1)
    if metrics is not None:
        pipe.hincrby(_counters_key(model), "prompt_tokens", metrics.prompt_tokens)
        pipe.hincrby(_counters_key(model), "generation_tokens", metrics.completion_tokens)
        if metrics.ttft_ms is not None:
            waited_ms = (metrics.queue_ms or 0) + metrics.ttft_ms
            _observe(pipe, model, "time_to_first_token_seconds", waited_ms / 1000)
        if metrics.decode_ms and metrics.completion_tokens >= 2:
            gaps = metrics.completion_tokens - 1
            _observe(
                pipe, model, "inter_token_latency_seconds", metrics.decode_ms / 1000 / gaps, gaps
            )
        if metrics.queue_ms is not None:
            _observe(pipe, model, "request_queue_time_seconds", metrics.queue_ms / 1000)
        if metrics.e2e_ms is not None:
            _observe(pipe, model, "e2e_request_latency_seconds", metrics.e2e_ms / 1000)
    pipe.execute()
    return True


class WorkbenchCollector:
    """Reads the shared state at scrape time (see the module docstring)."""

    def collect(self):
        from monitoring import telemetry

        client = redis_pool.client()
        models = sorted(m.decode() for m in client.smembers(_models_key()))

        running = GaugeMetricFamily(
            f"{PREFIX}num_requests_running", "Generations running now.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            f"{PREFIX}num_requests_waiting", "Generations queued, not started.", labels=["model"]
        )
        live = (
            Generation.objects.filter(state__in=[Generation.QUEUED, Generation.RUNNING])
            .values_list("model__name", "state")
            .annotate(n=Count("id"))
            .order_by()
        )
        counts = {(name, state): n for name, state, n in live}
        for name in sorted({*models, *(name for name, _ in counts)}):
            running.add_metric([name], counts.get((name, Generation.RUNNING), 0))
            waiting.add_metric([name], counts.get((name, Generation.QUEUED), 0))
        yield running
        yield waiting
        yield from _vllm_families(counts, models)

        counters = {model: client.hgetall(_counters_key(model)) for model in models}
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"{PREFIX}{name}", help_text, labels=["model"])
            for model in models:
                family.add_metric([model], int(counters[model].get(name.encode(), 0)))
            yield family
        finished = CounterMetricFamily(
            f"{PREFIX}request_finished",
            "Generations that reached a final state.",
            labels=["model", "state"],
        )
        for model in models:
            for field, value in sorted(counters[model].items()):
                if field.startswith(b"finished:"):
                    finished.add_metric([model, field.decode().split(":", 1)[1]], int(value))
        yield finished

        for name, (help_text, bounds) in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"{PREFIX}{name}", help_text, labels=["model"])
            for model in models:
                stored = client.hgetall(_histogram_key(model, name))
                if not stored:
                    continue
                cumulative, buckets = 0, []
                for i, upper in enumerate(bounds):
                    cumulative += int(stored.get(str(i).encode(), 0))
                    buckets.append((repr(float(upper)), cumulative))
                buckets.append(("+Inf", int(stored.get(b"count", 0))))
                family.add_metric([model], buckets, float(stored.get(b"sum", 0)))
            yield family

        yield from _gpu_families(telemetry.current_gpus())


def _vllm_families(counts: dict, models: list[str]):
    """The load gauges under vLLM's names, which operators' dashboards already use:
    requests running and waiting per model, and the share of the models' KV cache
    in use, from the live workers' heartbeats."""
    names = sorted({*models, *(name for name, _ in counts)})
    running = GaugeMetricFamily(
        "vllm:num_requests_running", "Requests running on a model now.", labels=["model_name"]
    )
    waiting = GaugeMetricFamily(
        "vllm:num_requests_waiting", "Requests waiting to start.", labels=["model_name"]
    )
    for name in names:
        running.add_metric([name], counts.get((name, Generation.RUNNING), 0))
        waiting.add_metric([name], counts.get((name, Generation.QUEUED), 0))
    kv = GaugeMetricFamily(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage of the model's live workers, 0 to 1.",
        labels=["model_name"],
    )
    cells: dict[str, list[int]] = {}
    for worker in live_workers():
        engine = worker.get("engine") or {}
        if engine.get("n_ctx"):
            used = cells.setdefault(worker["model"], [0, 0])
            used[0] += engine.get("kv_used", 0)
            used[1] += engine["n_ctx"]
    for name, (used, total) in sorted(cells.items()):
        kv.add_metric([name], used / total)
    yield running
    yield waiting
    yield kv


def _gpu_families(gpus: list[dict]):
    gauges = {
        "gpu_memory_used_bytes": ("GPU memory in use.", "memory_used_bytes"),
        "gpu_memory_total_bytes": ("GPU memory in all.", "memory_total_bytes"),
        "gpu_utilization_ratio": ("GPU utilisation, 0 to 1.", "utilization_pct"),
        "gpu_temperature_celsius": ("GPU temperature.", "temperature_c"),
        "gpu_power_watts": ("GPU power draw.", "power_w"),
        "gpu_power_limit_watts": ("GPU power limit.", "power_limit_w"),
    }
    for name, (help_text, field) in gauges.items():
        family = GaugeMetricFamily(f"{PREFIX}{name}", help_text, labels=["host", "gpu", "uuid"])
        for gpu in gpus:
            value = gpu.get(field)
            if value is None:
                continue  # unknown is absent, never zero
            if field == "utilization_pct":
                value = value / 100
            family.add_metric([gpu["host"], str(gpu["index"]), gpu["uuid"]], value)
        yield family


def exposition() -> bytes:
    """The Prometheus text format of everything above."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkbenchCollector())
    return generate_latest(registry)
