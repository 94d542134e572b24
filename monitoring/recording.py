"""Turns what a run measured into its RequestMetrics row (monitoring.receivers)."""

from __future__ import annotations

import os
import socket

from django.utils import timezone

from monitoring.models import RequestMetrics


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _ms(seconds: float | None) -> float | None:
    return seconds * 1000 if seconds is not None else None


def record_metrics(generation, stats, resources: dict, *, n_ctx: int) -> RequestMetrics:
    """Create or replace the metrics row of `generation` from a finished run."""
    started_at = generation.started_at
    queue_ms = (started_at - generation.queued_at).total_seconds() * 1000 if started_at else None
    itl = stats.inter_token_ms()
    # The worker records just before it marks the generation finished.
    finished_at = generation.finished_at or timezone.now()
    fields = dict(
        prompt_tokens=stats.prompt_tokens,
        cached_tokens=stats.cached_tokens,
        completion_tokens=stats.completion_tokens,
        n_ctx=n_ctx,
        context_used=stats.prompt_tokens + stats.completion_tokens,
        queue_ms=queue_ms,
        ttft_ms=_ms(stats.prompt_eval_s),
        prompt_eval_ms=_ms(stats.prompt_eval_s),
        prompt_tokens_per_s=stats.prompt_tokens_per_s,
        decode_ms=_ms(stats.decode_s),
        decode_tokens_per_s=stats.decode_tokens_per_s,
        itl_p50_ms=percentile(itl, 50),
        itl_p95_ms=percentile(itl, 95),
        e2e_ms=(finished_at - generation.queued_at).total_seconds() * 1000,
        batch_size_mean=stats.batch_size_mean,
        batch_size_max=stats.batch_size_max or None,
        host=socket.gethostname(),
        pid=os.getpid(),
        **resources,
    )
    record, _ = RequestMetrics.objects.update_or_create(generation=generation, defaults=fields)
    return record
