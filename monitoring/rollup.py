"""Keeps the daily usage sums the pages read in step with generations.

UsageDaily (day, user, team, model, source) is recomputed from Generation and
RequestMetrics a slice at a time (one user's day, or everyone's days in a range)
and replaced whole, so a refresh is idempotent and a missed one is mended by the
next (the beat task `refresh_recent_usage`). Two coarser tables are re-summed from
it in the same transaction: UsageDailyTotal (over users) and UsageDailyUser (over
models, sources and teams), for the admin overview.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

from django.db import connection, transaction
from django.db.models import Count, Max, Q, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from inference.models import Generation
from monitoring.models import UsageDaily, UsageDailyTotal, UsageDailyUser

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
    # Imported answers were never run here: no request, no cost.
    generations = (
        Generation.objects.filter(queued_at__gte=start, queued_at__lt=end)
        .exclude(state__in=[Generation.QUEUED, Generation.RUNNING])
        .exclude(source=Generation.SOURCE_IMPORT)
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
        _resum(UsageDailyTotal, ["team_id", "model_id", "source"], first, last)
        _resum(UsageDailyUser, ["user_id"], first, last, user_id=user_id)
    return len(rows)


def _resum(target, keys: list[str], first: date, last: date, user_id: int | None = None):
    """Rebuild `target`'s rows for the days first..last (and one user) by summing
    UsageDaily over every column but `keys`."""
    skip = {"id", "day", "user", "team", "model", "source", "vram_peak_max_bytes"}
    sums = {f.name: Sum(f.name) for f in target._meta.concrete_fields if f.name not in skip}
    sums["vram_peak_max_bytes"] = Max("vram_peak_max_bytes")
    fine = UsageDaily.objects.filter(day__gte=first, day__lte=last)
    stale = target.objects.filter(day__gte=first, day__lte=last)
    if user_id is not None:
        fine, stale = fine.filter(user_id=user_id), stale.filter(user_id=user_id)
    stale.delete()
    rows = fine.values("day", *keys).annotate(**sums).order_by()
    target.objects.bulk_create(
        [target(**row) for row in rows.iterator(chunk_size=5000)], batch_size=5000
    )


def refresh_for(generation: Generation) -> None:
    """Bring the day of `generation` up to date for its user."""
    day = timezone.localdate(generation.queued_at)
    refresh(day, day, user_id=generation.user_id)
