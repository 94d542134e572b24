"""Reads that build what the server sends about generations and conversations, over
websockets and the API (docs/protocol.md)."""

from __future__ import annotations

import logging
import math
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone
from redis.exceptions import RedisError

from mixtralweb import namespace

from . import broker, streams
from .models import Conversation, Generation, LanguageModel, Message, WorkerHeartbeat
from .workers import live_workers

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
    "batch_size_mean",
    "batch_size_max",
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
        "max_tokens": max_tokens_of(gen),
        "reason": gen.reason,
        "stopped_by": stopped_by(gen),
        "metrics": metrics_payload(_metrics_of(gen)),
    }


def stopped_by(gen: Generation) -> str | None:
    """Who stopped a stopped answer (a team-mate may stop one they watch), read from
    the row: the worker that ends it holds a copy from before the stop."""
    if gen.state != Generation.CANCELLED:
        return None
    field = f"stopped_by__{get_user_model().USERNAME_FIELD}"
    return Generation.objects.filter(pk=gen.pk).values_list(field, flat=True).first()


def max_tokens_of(gen: Generation) -> int | None:
    """The answer's token limit: an answer that ends with finish_reason "length"
    stopped at it, or at the end of the context if it wrote fewer tokens."""
    value = (gen.params or {}).get("max_tokens")
    return int(value) if value is not None else None


def announce_final(gen: Generation, stream: streams.GenerationStream | None = None) -> None:
    """Tell everyone following the generation that it has ended, with its text and
    metrics: the one place the final event is sent from. A worker passes its stream,
    so that the event follows the text sent before it."""
    if stream is not None:
        stream.close(final_event(gen))
    else:
        streams.announce(namespace.generation_group(gen.pk), final_event(gen))


def live_text(gen: Generation) -> str:
    """What the user has seen of a running generation: the Redis live text, which
    is ahead of the periodic database flush, or the database text."""
    if gen.state == Generation.RUNNING:
        text = streams.live_text(gen)
        if text is not None and len(text) >= len(gen.text):
            return text
    return gen.text


log = logging.getLogger(__name__)


def queue_position(gen: Generation) -> int | None:
    """1 when next in line. Chat and API generations wait only behind each other:
    background jobs use the model's bulk queue, which workers take last. Nobody
    waits behind a generation whose task is lost (stranded)."""
    return queue_place(gen)[0]


def queue_place(gen: Generation) -> tuple[int | None, bool]:
    """Its queue position (None unless queued) and whether its own task is lost,
    from one read of the queue."""
    if gen.state != Generation.QUEUED:
        return None, False
    ahead = list(
        Generation.objects.filter(
            model_id=gen.model_id, state=Generation.QUEUED, queued_at__lt=gen.queued_at
        )
        .exclude(source__in=Generation.BACKGROUND_SOURCES)
        .values_list("pk", "queued_at")
    )
    lost = stranded(gen.model.name, [*ahead, (gen.pk, gen.queued_at)])
    return len(ahead) - len(lost - {gen.pk}) + 1, gen.pk in lost


def stranded(model_name: str, queued: list[tuple[int, object]]) -> set[int]:
    """Of these queued generations (pk, queued_at) of one model, those whose task is
    lost: queued longer than GENERATION_STRANDED_AFTER_S, waiting in none of the
    model's queues, held by no live worker. The reaper sends them again or fails them
    at its next round (tasks.requeue_stranded_generations); what the queue shows
    meanwhile counts only the generations that really wait. Without Redis, none."""
    cutoff = timezone.now() - timedelta(seconds=settings.GENERATION_STRANDED_AFTER_S)
    old = {pk for pk, queued_at in queued if queued_at < cutoff}
    if not old:
        return set()
    try:
        held = {pk for worker in live_workers() for pk in worker.get("held", ())}
        waiting = broker.waiting_generations([model_name])
    except RedisError:
        log.warning("queue positions count every queued generation: Redis is not answering")
        return set()
    return old - held - waiting


# Estimates and the status's median time to first token read this many recent answers.
RECENT_ANSWERS = 20


def queue_eta_s(gen: Generation, position: int | None) -> float | None:
    """About how long until it starts, from the real service rate: the model's live
    workers each run n_parallel answers at once, each taking about the mean time of
    its recent answers; the queue ahead drains that many at a time."""
    if position is None:
        return None
    model = LanguageModel.objects.filter(pk=gen.model_id).only("name", "n_parallel").first()
    if model is None:
        return None
    return _wait_s(model, position, _recent_answers(model.pk), live_workers(model.name))


def _recent_answers(model_id: int) -> list[tuple]:
    """(started_at, first_token_at, finished_at, source) of the model's latest
    finished answers, newest first."""
    return list(
        Generation.objects.filter(
            model_id=model_id, state=Generation.DONE, started_at__isnull=False
        )
        .order_by("-finished_at")
        .values_list("started_at", "first_token_at", "finished_at", "source")[:RECENT_ANSWERS]
    )


def _wait_s(model: LanguageModel, position: int, recent: list[tuple], workers: list[dict]):
    """About how long until the answer at `position` starts: the queue drains
    (live workers x n_parallel) at a time, each taking the recent answers' mean."""
    if not recent:
        return None
    mean_s = sum((end - start).total_seconds() for start, _, end, _ in recent) / len(recent)
    at_once = max(1, len(workers)) * model.n_parallel
    return round(math.ceil(position / at_once) * mean_s, 1)


def _median_ttft_ms(recent: list[tuple]) -> float | None:
    """The median time to first token (started -> first token: prompt evaluation)
    of the recent chat and API answers; job passes and batch lines (background) apart."""
    times = sorted(
        (first - start).total_seconds() * 1000
        for start, first, _, source in recent
        if first is not None and source not in Generation.BACKGROUND_SOURCES
    )
    if not times:
        return None
    middle = len(times) // 2
    median = times[middle] if len(times) % 2 else (times[middle - 1] + times[middle]) / 2
    return round(median)


STATUS_READY = "ready"
STATUS_BUSY = "busy"
STATUS_LOADING = "loading"
STATUS_DOWN = "down"


def model_status(model: LanguageModel, workers: list[dict] | None = None) -> dict:
    """What everyone may know of a model now (the chat page's status, /status/,
    docs/monitoring.md): its state, the answers running and waiting, about how long
    a new question waits, and the recent median time to first token. Never a host,
    PID, path or the worker's own words. workers: the live workers, if the caller
    has read them (any model's); otherwise they are read now.

    ready: a worker serves it and nothing runs or waits; busy: answers run or wait
    (a new question may still start at once while a sequence is free: `eta_s` is
    null then); loading: no worker serves it yet, one is loading it (`progress`
    0-1); down: no worker serves or loads it (none runs, or it failed to load)."""
    if workers is None:
        workers = live_workers(model.name)
    mine = [w for w in workers if w["model"] == model.name]
    serving = [w for w in mine if w["state"] in (WorkerHeartbeat.READY, WorkerHeartbeat.BUSY)]
    loading = [w for w in mine if w["state"] == WorkerHeartbeat.LOADING]
    recent = _recent_answers(model.pk)
    status = {
        "model": model.name,
        "state": STATUS_DOWN,
        "running": 0,
        "waiting": 0,
        "eta_s": None,
        "progress": None,
        "ttft_ms": _median_ttft_ms(recent),
    }
    if not serving:
        if loading:
            status["state"] = STATUS_LOADING
            status["progress"] = max(float(w.get("load_progress") or 0) for w in loading)
        return status
    # From the rows, where a claim moves an answer from queued to running at once
    # (a heartbeat says it a moment later): running, background work included;
    # waiting, chat and API answers queued (jobs and batches wait behind them), not
    # those whose task is lost, as queue positions count them.
    live = Generation.objects.filter(
        model_id=model.pk, state__in=[Generation.QUEUED, Generation.RUNNING]
    ).values_list("pk", "queued_at", "state", "source")
    running, queued = 0, []
    for pk, queued_at, state, source in live:
        if state == Generation.RUNNING:
            running += 1
        elif source not in Generation.BACKGROUND_SOURCES:
            queued.append((pk, queued_at))
    waiting = len(queued) - len(stranded(model.name, queued))
    capacity = sum(
        int((w.get("engine") or {}).get("n_parallel") or model.n_parallel) for w in serving
    )
    status.update(running=running, waiting=waiting)
    if running or waiting:
        status["state"] = STATUS_BUSY
        if waiting or running >= capacity:
            # A new question would be next after those waiting.
            status["eta_s"] = _wait_s(model, waiting + 1, recent, serving)
    else:
        status["state"] = STATUS_READY
    return status


def generation_snapshot(gen: Generation) -> dict:
    """A generation as it stands now; `text` is everything streamed so far."""
    position, lost = queue_place(gen)
    return {
        "type": "generation.snapshot",
        "generation": gen.pk,
        "conversation": gen.conversation_id,
        "state": gen.state,
        "text": live_text(gen),
        "reason": gen.reason,
        "stopped_by": stopped_by(gen),
        "finish_reason": gen.finish_reason,
        "max_tokens": max_tokens_of(gen),
        "position": position,
        # Its task was lost: the reaper sends it again shortly, or fails it with why;
        # no estimate meanwhile.
        "stranded": lost,
        "eta_s": None if lost else queue_eta_s(gen, position),
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


def new_turn_payloads(message: Message, generation: Generation) -> list[dict]:
    """The user's message (as created) and the answer's, with the generation read
    now: the worker may have started it already."""
    assistant = Message.objects.select_related("generation").get(generation=generation)
    return [message_payload(message), message_payload(assistant)]


def live_generation_ids(conversation: Conversation) -> list[int]:
    return list(
        conversation.generations.filter(
            state__in=[Generation.QUEUED, Generation.RUNNING]
        ).values_list("pk", flat=True)
    )


def conversation_snapshot(conversation: Conversation) -> dict:
    messages = conversation.messages.current().select_related("author", "generation__metrics")
    return {
        "type": "conversation.snapshot",
        "conversation": {
            "id": conversation.pk,
            "title": str(conversation),
            "model": conversation.model.name,
            "n_ctx": conversation.model.n_ctx,
            "team": conversation.team.name if conversation.team_id else None,
            "owner": conversation.owner.get_username(),
        },
        "messages": [message_payload(m) for m in messages],
    }


def queued_snapshots(generation_ids: list[int]) -> list[dict]:
    """Snapshots of those generations still queued (their position and estimate)."""
    queued = Generation.objects.filter(pk__in=generation_ids, state=Generation.QUEUED)
    return [generation_snapshot(gen) for gen in queued]
