"""Issue 5: what monitoring costs.

1. The per-request sampler: time spent sampling as a share of decode time, and
   decode speed with and without it (SmolLM2 on this machine's CPU; NVML is read
   too where an NVIDIA GPU exists).
2. The usage pages over 1,000,000 request records: `generate_usage` fills the
   bench database once (COPY), then My usage and the admin overview are requested
   in-process (Django test client: middleware, queries, templates) and timed.
"""

from __future__ import annotations

import os
import re
import statistics
import threading
import time
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from inference.engine import Engine, RunStats, Sampling
from inference.models import Generation, LanguageModel
from inference.registry import ensure_default_model, load_options
from monitoring import nvml, rollup
from monitoring.sampler import ResourceSampler
from tests.bench.harness import prepare_database

RECORDS = 1_000_000
RUNS = 3
MAX_TOKENS = 256
PAGE_REQUESTS = 40
TARGET_P95_MS = 200


def percentile(values, pct):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


def _decode(engine, prompt, sampled: bool) -> dict:
    stats = RunStats()
    sampling = Sampling(max_tokens=MAX_TOKENS, temperature=0.7, seed=42)
    cancel = threading.Event()
    if sampled:
        gpu = 0 if nvml.available() else None
        with ResourceSampler(gpu_index=gpu, interval_s=0.1) as sampler:
            for _ in engine.stream(prompt, sampling, cancel, stats):
                pass
        cost = sampler.sample_seconds
        samples = sampler.samples
    else:
        for _ in engine.stream(prompt, sampling, cancel, stats):
            pass
        cost, samples = 0.0, 0
    return {
        "decode_s": stats.decode_s,
        "tps": stats.decode_tokens_per_s,
        "sample_s": cost,
        "samples": samples,
    }


def sampler_cost() -> None:
    engine = Engine(load_options(ensure_default_model()))
    prompt = engine.chat_prompt_tokens(
        [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    )
    _decode(engine, prompt, sampled=False)  # warm-up: load pages, fill the prefix cache
    with_sampler, without = [], []
    for _ in range(RUNS):
        without.append(_decode(engine, prompt, sampled=False))
        with_sampler.append(_decode(engine, prompt, sampled=True))
    decode_s = sum(r["decode_s"] for r in with_sampler)
    sample_s = sum(r["sample_s"] for r in with_sampler)
    samples = sum(r["samples"] for r in with_sampler)
    print(f"Sampler at 100 ms, NVML: {'yes' if nvml.available() else nvml.NO_GPU_MESSAGE}")
    print(f"  samples taken          {samples}")
    print(f"  time per sample        {sample_s / samples * 1e6:.0f} µs")
    print(f"  sampling / decode time {sample_s / decode_s * 100:.3f} %  (target < 1 %)")
    print(
        f"  decode tokens/s        with {statistics.median(r['tps'] for r in with_sampler):.1f}"
        f", without {statistics.median(r['tps'] for r in without):.1f} (medians of {RUNS})"
    )


def ensure_records() -> None:
    have = Generation.objects.filter(worker="bench:1").count()
    if have < RECORDS:
        began = time.monotonic()
        call_command("generate_usage", count=RECORDS - have, seed=have + 1)
        print(f"Generated {RECORDS - have:,} records in {time.monotonic() - began:.0f} s")


def time_page(client: Client, url: str, params: dict) -> tuple[float, float, float]:
    """Wall-clock p50 and p95, and the p95 of this (web) process's CPU time: on a
    shared, busy machine the wall clock also counts waiting for a core."""
    for _ in range(3):
        assert client.get(url, params).status_code == 200, url
    wall, cpu = [], []
    for _ in range(PAGE_REQUESTS):
        began, began_cpu = time.perf_counter(), time.process_time()
        response = client.get(url, params)
        wall.append((time.perf_counter() - began) * 1000)
        cpu.append((time.process_time() - began_cpu) * 1000)
        assert response.status_code == 200
    return statistics.median(wall), percentile(wall, 95), percentile(cpu, 95)


def page_latency() -> None:
    User = get_user_model()
    heavy = User.objects.get(username="bench")
    staff, _ = User.objects.get_or_create(username="bench-staff", defaults={"is_staff": True})
    model = LanguageModel.objects.get(name="bench-model-mixtral")
    today = timezone.localdate()
    quarter = {"start": today - timedelta(days=89), "end": today}
    mine = Generation.objects.filter(user=heavy).count()
    total = Generation.objects.count()
    load = os.getloadavg()[0]
    print(f"\nPages over {total:,} requests ({mine:,} of them by the user 'bench')")
    print(f"(in-process Django test client; load average {load:.1f} on {os.cpu_count()} cores)")
    print(f"{'page':44} {'p50 ms':>8} {'p95 ms':>8} {'CPU p95':>8} {'queries':>8} {'SQL ms':>8}")
    client = Client(SERVER_NAME="localhost")
    cases = [
        ("My usage, last 30 days", heavy, "/usage/", {}),
        (
            "My usage, 90 days, one model, API only",
            heavy,
            "/usage/",
            {**quarter, "model": model.pk, "source": "api"},
        ),
        ("My usage, second page of requests (keyset)", heavy, "/usage/", {"before": "__older__"}),
        ("Admin overview, last 30 days", staff, "/usage/admin/", {}),
        ("Admin overview, 90 days", staff, "/usage/admin/", quarter),
    ]
    worst = 0.0
    for label, user, url, params in cases:
        client.force_login(user)
        if params.get("before") == "__older__":
            older = re.search(r"before=(\d+)", client.get(url).content.decode())
            params = {"before": older.group(1)}
        p50, p95, cpu95 = time_page(client, url, params)
        worst = max(worst, p95)
        with CaptureQueriesContext(connection) as queries:
            client.get(url, params)
        sql_ms = sum(float(q["time"]) for q in queries.captured_queries) * 1000
        count = len(queries.captured_queries)
        print(f"{label:44} {p50:8.1f} {p95:8.1f} {cpu95:8.1f} {count:8d} {sql_ms:8.1f}")
    print(
        f"worst p95 {worst:.1f} ms: {'within' if worst <= TARGET_P95_MS else 'OVER'} "
        f"the {TARGET_P95_MS} ms target"
    )
    latest = Generation.objects.filter(user=heavy).order_by("-queued_at").first()
    times = []
    for _ in range(10):
        began = time.perf_counter()
        rollup.refresh_for(latest)
        times.append((time.perf_counter() - began) * 1000)
    print(
        f"Rollup refresh a worker pays per finished generation (user 'bench', one day): "
        f"median {statistics.median(times):.1f} ms"
    )


def main() -> None:
    prepare_database()
    sampler_cost()
    ensure_records()
    page_latency()
