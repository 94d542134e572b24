"""The shapes of what the server sends over websockets (docs/protocol.md)."""

from __future__ import annotations

from mixtralweb import redis_pool

from .models import Generation, Message
from .publisher import live_text_key

METRIC_FIELDS = [
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "n_ctx",
    "context_used",
    "queue_ms",
    "ttft_ms",
    "prompt_eval_ms",
    "decode_ms",
    "decode_tokens_per_s",
    "itl_p50_ms",
    "itl_p95_ms",
    "vram_process_peak_bytes",
    "gpu_index",
]


def metrics_payload(metrics) -> dict | None:
    if metrics is None:
        return None
    return {name: getattr(metrics, name) for name in METRIC_FIELDS}


def _metrics_of(gen: Generation):
    if not gen.is_final:
        return None  # the metrics row is written when the generation ends
    try:
        return gen.metrics
    except Generation.metrics.RelatedObjectDoesNotExist:
        return None


def final_event(gen: Generation) -> dict:
    return {
        "type": "generation.final",
        "generation": gen.pk,
        "state": gen.state,
        "text": gen.text,
        "finish_reason": gen.finish_reason,
        "reason": gen.reason,
        "metrics": metrics_payload(_metrics_of(gen)),
    }


def live_text(gen: Generation) -> str:
    """What the user has seen of a running generation: the Redis live text, which
    is ahead of the periodic database flush, or the database text."""
    if gen.state == Generation.RUNNING:
        live = redis_pool.client().get(live_text_key(gen.pk))
        if live is not None:
            text = live.decode("utf-8", "replace")
            if len(text) >= len(gen.text):
                return text
    return gen.text


def queue_position(gen: Generation) -> int | None:
    """1 when next in line. Chat and API generations wait only behind each other:
    background jobs use the model's bulk queue, which workers take last."""
    if gen.state != Generation.QUEUED:
        return None
    ahead = Generation.objects.filter(
        model_id=gen.model_id, state=Generation.QUEUED, queued_at__lt=gen.queued_at
    ).exclude(source=Generation.SOURCE_JOB)
    return ahead.count() + 1


def queue_eta_s(gen: Generation, position: int | None) -> float | None:
    """About how long until it starts: the position times the mean duration of the
    model's recent generations, plus what is left of the one running."""
    if position is None:
        return None
    recent = list(
        Generation.objects.filter(
            model_id=gen.model_id, state=Generation.DONE, started_at__isnull=False
        )
        .order_by("-finished_at")
        .values_list("started_at", "finished_at")[:20]
    )
    if not recent:
        return None
    mean_s = sum((end - start).total_seconds() for start, end in recent) / len(recent)
    return round(position * mean_s, 1)


def generation_snapshot(gen: Generation) -> dict:
    """A generation as it stands now; `text` is everything streamed so far."""
    position = queue_position(gen)
    return {
        "type": "generation.snapshot",
        "generation": gen.pk,
        "conversation": gen.conversation_id,
        "state": gen.state,
        "text": live_text(gen),
        "reason": gen.reason,
        "finish_reason": gen.finish_reason,
        "position": position,
        "eta_s": queue_eta_s(gen, position),
        "metrics": metrics_payload(_metrics_of(gen)),
    }


def message_payload(message: Message) -> dict:
    payload = {
        "id": message.pk,
        "role": message.role,
        "author": message.author.get_username() if message.author_id else None,
        "created_at": message.created_at.isoformat(),
        "text": message.content,
        "generation": None,
        "edited": message.edited_from_id is not None,
        "dropped_from_context": message.dropped_from_context,
    }
    if message.generation_id:
        snapshot = generation_snapshot(message.generation)
        payload["text"] = snapshot["text"]
        payload["generation"] = {k: v for k, v in snapshot.items() if k != "type"}
    return payload
