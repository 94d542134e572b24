"""Keeps UsageDaily, the daily sums the usage pages read, in step with generations.

A slice (one user's day, or every user's days in a range) is recomputed from
Generation and RequestMetrics and replaced whole, so a refresh is idempotent and a
missed one is mended by the next (the beat task `refresh_recent_usage`).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

from django.db import connection, transaction
from django.db.models import Count, Max, Q, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from inference.models import Generation
from monitoring.models import UsageDaily

# Serialises refreshes on PostgreSQL: two workers finishing for the same user at once
# must not both delete the old slice and both insert a new one.
_ADVISORY_LOCK_ID = 0x6D6F6E5F726F6C6C  # "mon_roll"


def day_bounds(first: date, last: date) -> tuple[datetime, datetime]:
    """[start, end) instants of the days first..last in the current time zone."""
    tz = timezone.get_current_timezone()
    start = timezone.make_aware(datetime.combine(first, time.min), tz)
    end = timezone.make_aware(datetime.combine(last + timedelta(days=1), time.min), tz)
    return start, end


def _aggregate(generations):
    m = "metrics__"
    return (
        generations.annotate(day=TruncDate("queued_at"))
        .values("day", "user_id", "team_id", "model_id", "source")
        .annotate(
            requests=Count("id"),
            failed=Count("id", filter=Q(state=Generation.FAILED)),
            cancelled=Count("id", filter=Q(state=Generation.CANCELLED)),
            prompt_tokens=Coalesce(Sum(f"{m}prompt_tokens"), 0),
            cached_tokens=Coalesce(Sum(f"{m}cached_tokens"), 0),
            completion_tokens=Coalesce(Sum(f"{m}completion_tokens"), 0),
            decode_tps_sum=Coalesce(Sum(f"{m}decode_tokens_per_s"), 0.0),
            decode_tps_count=Count(f"{m}decode_tokens_per_s"),
            ttft_ms_sum=Coalesce(Sum(f"{m}ttft_ms"), 0.0),
            ttft_ms_count=Count(f"{m}ttft_ms"),
            queue_ms_sum=Coalesce(Sum(f"{m}queue_ms"), 0.0),
            queue_ms_count=Count(f"{m}queue_ms"),
            e2e_ms_sum=Coalesce(Sum(f"{m}e2e_ms"), 0.0),
            e2e_ms_count=Count(f"{m}e2e_ms"),
            vram_peak_max_bytes=Max(f"{m}vram_device_peak_bytes"),
            energy_j_sum=Sum(f"{m}energy_j"),
        )
        .order_by()
    )


def refresh(first: date, last: date, *, user_id: int | None = None) -> int:
    """Recompute the days first..last (of one user, or of everyone). Returns rows written."""
    start, end = day_bounds(first, last)
    generations = Generation.objects.filter(queued_at__gte=start, queued_at__lt=end).exclude(
        state__in=[Generation.QUEUED, Generation.RUNNING]
    )
    stale = UsageDaily.objects.filter(day__gte=first, day__lte=last)
    if user_id is not None:
        generations = generations.filter(user_id=user_id)
        stale = stale.filter(user_id=user_id)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_ADVISORY_LOCK_ID])
        stale.delete()
        rows = [UsageDaily(**row) for row in _aggregate(generations).iterator(chunk_size=5000)]
        UsageDaily.objects.bulk_create(rows, batch_size=5000)
    return len(rows)


def refresh_for(generation: Generation) -> None:
    """Bring the day of `generation` up to date for its user."""
    day = timezone.localdate(generation.queued_at)
    refresh(day, day, user_id=generation.user_id)
