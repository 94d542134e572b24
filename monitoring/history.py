"""GPU history for the GPU page: raw samples for short ranges, minute means beyond."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from statistics import fmean

from django.conf import settings
from django.utils import timezone

from monitoring.models import GpuMinute, GpuSample

RANGES = {"1h": 1, "6h": 6, "24h": 24, "7d": 24 * 7, "30d": 24 * 30}
MAX_POINTS = 300
FIELDS = ["memory_used_bytes", "utilization_pct", "temperature_c", "power_w"]


def _mean(values):
    values = [v for v in values if v is not None]
    return round(fmean(values), 2) if values else None


def gpu_history(since) -> list[dict]:
    """Per host and GPU: times and the four charted values, at most MAX_POINTS each."""
    hours = (timezone.now() - since).total_seconds() / 3600
    if hours <= settings.GPU_RAW_RETENTION_HOURS:
        rows = GpuSample.objects.filter(sampled_at__gte=since).values_list(
            "host", "gpu_index", "sampled_at", *FIELDS
        )
    else:
        rows = GpuMinute.objects.filter(minute__gte=since).values_list(
            "host", "gpu_index", "minute", *FIELDS
        )
    bucket_s = max(1.0, hours * 3600 / MAX_POINTS)
    buckets: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
    for host, index, at, *values in rows.order_by("sampled_at" if hours <= 24 else "minute"):
        slot = int(at.timestamp() // bucket_s)
        for name, value in zip(FIELDS, values, strict=True):
            buckets[(host, index)][(slot, name)].append(value)
    result = []
    for (host, index), points in sorted(buckets.items()):
        slots = sorted({slot for slot, _ in points})
        series = {"host": host, "gpu": index, "t": []}
        series.update({name: [] for name in FIELDS})
        for slot in slots:
            at = datetime.fromtimestamp(slot * bucket_s, tz=UTC)
            series["t"].append(at.isoformat())
            for name in FIELDS:
                series[name].append(_mean(points.get((slot, name), [])))
        series["memory_used_gib"] = [
            round(v / 2**30, 2) if v is not None else None for v in series.pop("memory_used_bytes")
        ]
        result.append(series)
    return result
