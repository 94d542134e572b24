"""The shapes of what the server sends about jobs (docs/jobs.md lists them)."""

from __future__ import annotations

from statistics import median

from django.db.models import Count, Prefetch, Q

from inference.models import Generation
from inference.selectors import live_text, metrics_payload, queue_position

from .models import Job, JobChunk


def batch_progress(jobs) -> None:
    """Set `requests` ({total, completed, failed}) on each API batch among `jobs`, in
    one query: the job list shows a batch's progress in its lines."""
    batch_ids = [job.pk for job in jobs if job.strategy == Job.BATCH]
    rows = (
        JobChunk.objects.filter(job_id__in=batch_ids)
        .values("job_id")
        .annotate(
            total=Count("id"),
            completed=Count("id", filter=Q(state=JobChunk.DONE)),
            failed=Count("id", filter=Q(state=JobChunk.FAILED)),
        )
    )
    by_job = {row.pop("job_id"): row for row in rows}
    for job in jobs:
        job.requests = by_job.get(job.pk)


def unread_count(user_id: int) -> int:
    """Finished jobs the owner has not looked at yet."""
    return Job.objects.filter(
        user_id=user_id, state__in=Job.FINAL_STATES, seen_at__isnull=True
    ).count()


def _metrics_of(gen: Generation):
    try:
        return gen.metrics
    except Generation.metrics.RelatedObjectDoesNotExist:
        return None


def pass_label(job: Job, chunk: JobChunk) -> str:
    if job.strategy == Job.BATCH:
        return f"Request {chunk.index + 1}"
    if job.strategy == Job.SINGLE:
        return "Answer"
    if chunk.level == 0:
        return f"Chunk {chunk.index + 1}"
    return f"Combine {chunk.level}.{chunk.index + 1}"


def _phase(job: Job, current: JobChunk | None) -> tuple[str, int | None]:
    """What the user sees: draft, queued (with position), evaluating, generating,
    or the final state."""
    if job.state == Job.DRAFT or job.is_final:
        return job.state, None
    if current is None or current.generation is None:
        return "queued", None
    gen = current.generation
    if gen.state == Generation.QUEUED:
        return "queued", queue_position(gen)
    if gen.state == Generation.RUNNING:
        return ("generating" if live_text(gen) else "evaluating"), None
    return "queued", None  # between passes


RATE_SAMPLE = 20  # the model's recent generations a time-left estimate rests on


def measured_rates(job: Job, chunks: list[JobChunk]) -> dict:
    """What the time left is computed from: prompt and decode tokens/s, and new
    tokens per pass. Measured on the job's own finished passes once there are any
    (same prompts, same machine), else on the model's recent generations; new tokens
    per pass are max_tokens until a pass of this job has finished. Rates are None
    when nothing was measured yet."""
    own = [
        c.generation.metrics
        for c in chunks
        if c.state == JobChunk.DONE and c.generation and _metrics_of(c.generation)
    ]
    measured = [
        (m.prompt_tokens_per_s, m.decode_tokens_per_s)
        for m in own
        if m.decode_tokens_per_s and m.prompt_tokens_per_s
    ]
    source = "job"
    if not measured:
        source = "model"
        # Through the generations' metrics relation: inference does not import
        # monitoring (tests/test_architecture.py).
        measured = list(
            Generation.objects.filter(
                model_id=job.model_id,
                metrics__decode_tokens_per_s__gt=0,
                metrics__prompt_tokens_per_s__gt=0,
            )
            .order_by("-metrics__created_at")
            .values_list("metrics__prompt_tokens_per_s", "metrics__decode_tokens_per_s")[
                :RATE_SAMPLE
            ]
        )
    new_tokens = job.max_tokens
    if own:
        new_tokens = min(job.max_tokens, round(sum(m.completion_tokens for m in own) / len(own)))
    if not measured:
        return {
            "source": None,
            "prompt_tokens_per_s": None,
            "decode_tokens_per_s": None,
            "new_tokens_per_pass": new_tokens,
        }
    return {
        "source": source,
        "prompt_tokens_per_s": median(prompt for prompt, _ in measured),
        "decode_tokens_per_s": median(decode for _, decode in measured),
        "new_tokens_per_pass": new_tokens,
    }


def job_snapshot(job: Job) -> dict:
    """A job as it stands now."""
    # Every pass's attempts in one query: a batch may have a thousand lines.
    attempts = Prefetch(
        "generations",
        queryset=Generation.objects.select_related("metrics").order_by("queued_at"),
    )
    chunks = list(
        job.chunks.select_related("generation__metrics")
        .prefetch_related(attempts)
        .order_by("level", "index")
    )
    current = next((c for c in chunks if c.state == JobChunk.RUNNING), None)
    if job.is_final:
        current = None
    phase, position = _phase(job, current)
    passes = []
    for chunk in chunks:
        gen = chunk.generation
        state = chunk.state
        if job.is_final and state == JobChunk.RUNNING:
            state = gen.state if gen else JobChunk.PENDING  # the pass the job ended in
        passes.append(
            {
                "level": chunk.level,
                "index": chunk.index,
                "label": pass_label(job, chunk),
                "state": state,
                "prompt_tokens": chunk.prompt_tokens,
                "weight": chunk.prompt_tokens + job.max_tokens,
                "generation": gen.pk if gen else None,
                "attempts": chunk.attempts,
                # Its answer stopped at max_tokens: the pass's text is cut short.
                "cut": bool(gen and gen.finish_reason == Generation.FINISH_LENGTH),
            }
        )
    level0 = sum(1 for c in chunks if c.level == 0)
    if job.strategy == Job.MAP_REDUCE and not any(c.level > 0 for c in chunks):
        # The combine pass is planned when the chunks are answered; until then
        # its size is an estimate.
        estimate = level0 * job.max_tokens // 2 + 200
        passes.append(
            {
                "level": 1,
                "index": 0,
                "label": "Combine",
                "state": "planned",
                "prompt_tokens": estimate,
                "weight": estimate + job.max_tokens,
                "generation": None,
                "attempts": 0,
                "cut": False,
            }
        )
    current_payload = None
    if current is not None and current.generation is not None:
        gen = current.generation
        current_payload = {
            "generation": gen.pk,
            "state": gen.state,
            "label": pass_label(job, current),
            "prompt_tokens": current.prompt_tokens,
            "max_tokens": job.max_tokens,
            "started_at": gen.started_at.isoformat() if gen.started_at else None,
        }
    metrics = []
    for chunk in chunks:
        for gen in chunk.generations.all():
            metrics.append(
                {
                    "label": pass_label(job, chunk),
                    "generation": gen.pk,
                    "state": gen.state,
                    "reason": gen.reason,
                    "metrics": metrics_payload(_metrics_of(gen)),
                }
            )
    return {
        "type": "job.snapshot",
        "job": job.pk,
        "title": str(job),
        "state": job.state,
        "phase": phase,
        "position": position,
        "reason": job.reason,
        "strategy": job.strategy,
        "n_ctx": job.n_ctx,
        "max_tokens": job.max_tokens,
        "document_tokens": job.document_tokens,
        "queued_at": job.queued_at.isoformat() if job.queued_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "passes": passes,
        "passes_done": sum(1 for c in chunks if c.state == JobChunk.DONE),
        "current": current_payload,
        "result": job.result if job.state == Job.DONE else "",
        # The result is the last pass's answer: it stopped at max_tokens.
        "result_cut": job.state == Job.DONE and bool(passes) and passes[-1]["cut"],
        "metrics": metrics,
        "rates": measured_rates(job, chunks) if not job.is_final else None,
    }
