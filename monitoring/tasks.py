"""Periodic upkeep of the monitoring tables, and the alerts (Celery beat, the ops
worker's queue)."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from statistics import fmean

from celery import shared_task
from django.conf import settings
from django.db.models import Max
from django.utils import timezone

from monitoring import alerting, rollup
from monitoring.models import GpuMinute, GpuSample

_MEAN_FIELDS = [
    "memory_used_bytes",
    "memory_total_bytes",
    "utilization_pct",
    "temperature_c",
    "power_w",
    "power_limit_w",
    "sm_clock_mhz",
    "mem_clock_mhz",
]


def _mean(values):
    values = [v for v in values if v is not None]
    return fmean(values) if values else None


def downsample(now=None) -> int:
    """Fold complete minutes of raw samples into GpuMinute rows, then apply retention.

    Re-running is harmless: a minute is recomputed from the same raw samples and
    replaces its row. Returns the number of minute rows written.
    """
    now = now or timezone.now()
    this_minute = now.replace(second=0, microsecond=0)
    raw_cutoff = now - timedelta(hours=settings.GPU_RAW_RETENTION_HOURS)
    last_done = GpuMinute.objects.aggregate(last=Max("minute"))["last"]
    since = max(last_done + timedelta(minutes=1), raw_cutoff) if last_done else raw_cutoff
    groups: dict[tuple, list[GpuSample]] = defaultdict(list)
    samples = GpuSample.objects.filter(sampled_at__gte=since, sampled_at__lt=this_minute)
    for sample in samples.iterator(chunk_size=5000):
        minute = sample.sampled_at.replace(second=0, microsecond=0)
        groups[(sample.host, sample.gpu_index, minute)].append(sample)
    rows = []
    for (host, gpu_index, minute), group in groups.items():
        means = {f: _mean(getattr(s, f) for s in group) for f in _MEAN_FIELDS}
        temps = [s.temperature_c for s in group if s.temperature_c is not None]
        eccs = [s.ecc_errors for s in group if s.ecc_errors is not None]
        rows.append(
            GpuMinute(
                host=host,
                gpu_index=gpu_index,
                gpu_uuid=group[-1].gpu_uuid,
                minute=minute,
                samples=len(group),
                **{
                    **means,
                    "memory_used_bytes": round(means["memory_used_bytes"]),
                    "memory_total_bytes": round(means["memory_total_bytes"]),
                },
                temperature_max_c=max(temps) if temps else None,
                throttle_reasons=sorted({r for s in group for r in s.throttle_reasons}),
                ecc_errors=max(eccs) if eccs else None,
            )
        )
    GpuMinute.objects.bulk_create(
        rows,
        batch_size=1000,
        update_conflicts=True,
        unique_fields=["host", "gpu_index", "minute"],
        update_fields=[
            "gpu_uuid",
            "samples",
            *_MEAN_FIELDS,
            "temperature_max_c",
            "throttle_reasons",
            "ecc_errors",
        ],
    )
    GpuSample.objects.filter(sampled_at__lt=raw_cutoff).delete()
    minute_cutoff = now - timedelta(days=settings.GPU_MINUTE_RETENTION_DAYS)
    GpuMinute.objects.filter(minute__lt=minute_cutoff).delete()
    return len(rows)


@shared_task(name="monitoring.tasks.downsample_gpu_samples")
def downsample_gpu_samples() -> int:
    return downsample()


@shared_task(name="monitoring.tasks.refresh_recent_usage")
def refresh_recent_usage() -> int:
    """Recompute yesterday's and today's daily usage for everyone: mends any refresh
    a worker missed (say, it died between saving a generation and summing it)."""
    today = timezone.localdate()
    return rollup.refresh(today - timedelta(days=1), today)


@shared_task(name="monitoring.tasks.evaluate_alerts")
def evaluate_alerts() -> int:
    """Open, repeat and resolve alerts (monitoring/alerting.py); returns the number
    of messages queued."""
    return len(alerting.evaluate())
