"""Celery tasks that run the model. One Engine per worker process, loaded inside it.

Tasks receive only a Generation id and are idempotent by it: a generation that is
already final is left alone, and a redelivered one (its worker died) continues
from the text the user already saw.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta

from asgiref.sync import async_to_sync
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_prerun, worker_process_init, worker_process_shutdown
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import (
    InterfaceError,
    OperationalError,
    close_old_connections,
    connection,
    transaction,
)
from django.utils import timezone

from mixtralweb import redis_pool
from monitoring.recording import record_metrics
from monitoring.sampler import ResourceSampler

from .engine import (
    Cancelled,
    ContextOverflow,
    DecodeError,
    Engine,
    ModelLoadError,
    RunStats,
    Sampling,
    TimeLimitExceeded,
)
from .events import final_event
from .gguf_inspect import GGUFError, inspect_gguf
from .models import Generation, LanguageModel, WorkerHeartbeat
from .publisher import Publisher, RelayClient, alive_key, cancel_key, live_text_key
from .registry import load_options
from .signals import generation_finished
from .workers import Heartbeat, describe_device

log = logging.getLogger(__name__)

# A generation whose worker died this many times fails instead of being retried.
MAX_ATTEMPTS = 2
# A claim that meets an unavailable database is tried again after this long, then
# twice as long after each further failure, up to CLAIM_RETRY_MAX_S.
CLAIM_RETRY_S = 1.0
CLAIM_RETRY_MAX_S = 30.0

_engine: Engine | None = None
_engine_key = None
# This process's heartbeat, when it is a model worker (started by `modelworker`).
_heartbeat: Heartbeat | None = None


def get_engine(model: LanguageModel) -> Engine:
    """The process's Engine for `model`, loaded on first use (after the fork).

    Raises ModelLoadError naming the file and the cause; the heartbeat says
    "loading" with llama.cpp's progress, then "ready" or "failed" with the reason.
    """
    global _engine, _engine_key
    options = load_options(model)
    if _engine is not None and _engine_key == options:
        return _engine
    _engine = None  # free the old model before loading the new one
    _engine_key = None
    if _heartbeat:
        _heartbeat.report(state=WorkerHeartbeat.LOADING, load_progress=0.0, reason="")
    try:
        # The header is checked first: a missing, truncated or foreign file gets a
        # precise reason instead of llama.cpp's "failed to load model".
        inspect_gguf(options.path)
        _engine = Engine(
            options,
            prefix_cache_bytes=settings.ENGINE_PREFIX_CACHE_MB * 1024 * 1024,
            on_load_progress=_heartbeat.loading_progress if _heartbeat else None,
        )
    except (GGUFError, ModelLoadError, MemoryError) as exc:
        reason = str(exc) if not isinstance(exc, MemoryError) else "out of memory while loading"
        if _heartbeat:
            _heartbeat.report(state=WorkerHeartbeat.FAILED, reason=reason)
        raise ModelLoadError(reason) from exc
    _engine_key = options
    if _heartbeat:
        _heartbeat.report(state=WorkerHeartbeat.READY, load_progress=1.0, reason="")
    return _engine


def _engine_loaded(model: LanguageModel) -> bool:
    return _engine is not None and _engine_key == load_options(model)


@worker_process_init.connect
def _load_model_after_fork(**_kwargs) -> None:
    """Load the worker's model in the pool process, after the fork, before the
    first request: the first user does not wait for the load."""
    global _heartbeat
    name = os.environ.get("WORKER_MODEL")
    model = LanguageModel.objects.filter(name=name).first() if name else None
    if model is None:
        return
    _heartbeat = Heartbeat(model.name, describe_device(model.n_gpu_layers)).start()
    RelayClient.get()  # the stream relay starts while the model loads
    try:
        get_engine(model)
    except ModelLoadError as exc:
        log.error("model %s failed to load in pid %s: %s", name, os.getpid(), exc)
        return
    log.info("model %s loaded in pid %s", name, os.getpid())


@task_prerun.connect
def _database_connection_for_the_task(sender=None, **_kwargs) -> None:
    """Keep the process's connection between tasks while it is usable and younger
    than CONN_MAX_AGE (Django's rule for requests), instead of Celery's reconnect
    per task (CELERY_DB_REUSE_MAX in settings turns that off).

    For an answer, without Django's health check (CONN_HEALTH_CHECKS), a SELECT 1
    before the task's first statement, on the way to the first token: that
    statement, the claim, is itself tried again on a new connection if the kept
    one has gone (_claim_on_a_live_connection). Other tasks keep the check."""
    close_old_connections()
    if getattr(sender, "name", None) == "inference.tasks.generate":
        connection.health_check_done = True


@worker_process_shutdown.connect
def _say_goodbye(**_kwargs) -> None:
    RelayClient.stop()
    if _heartbeat:
        _heartbeat.stop()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def sampling_from(params: dict) -> Sampling:
    return Sampling(
        max_tokens=int(params.get("max_tokens", 512)),
        temperature=float(params.get("temperature", 0.7)),
        top_p=float(params.get("top_p", 0.95)),
        seed=params.get("seed"),
        stop=tuple(params.get("stop") or ()),
    )


def _claim(generation_id: int) -> tuple[Generation, str] | None:
    """Mark the generation running. Returns it with the text already streamed, or
    None when there is nothing to do."""
    # The usual case, a queued generation: one statement (models.py), where the
    # locked path below takes four round trips.
    gen = Generation.objects.claim_queued(generation_id, worker_name())
    if gen is not None:
        return gen, gen.text
    # Redelivered, final, stopped before it started, or gone.
    with transaction.atomic():
        gen = (
            Generation.objects.select_for_update()
            .select_related("model")
            .filter(pk=generation_id)
            .first()
        )
        if gen is None or gen.is_final:
            return None
        prefix = gen.text
        if gen.state == Generation.RUNNING:
            # Redelivered: the worker that had it died. Keep what the user saw.
            live = redis_pool.client().get(live_text_key(gen.pk))
            if live is not None and len(live.decode("utf-8", "replace")) > len(prefix):
                prefix = live.decode("utf-8", "replace")
            if gen.attempts >= MAX_ATTEMPTS:
                gen.text = prefix
                _finish(
                    gen,
                    Generation.FAILED,
                    "The worker stopped during this answer "
                    f"{gen.attempts} times; it was not tried again.",
                )
                return None
        gen.state = Generation.RUNNING
        gen.attempts += 1
        gen.text = prefix
        gen.started_at = gen.started_at or timezone.now()
        gen.heartbeat_at = timezone.now()
        gen.worker = worker_name()
        # Only what changed: the row also holds the input, up to a whole document.
        gen.save(
            update_fields=["state", "attempts", "text", "started_at", "heartbeat_at", "worker"]
        )
    return gen, prefix


def _claim_on_a_live_connection(generation_id: int) -> tuple[Generation, str] | None:
    """_claim, once more on a new connection if it failed on one kept from an earlier
    task (closed since, by a database restart say). Errors on a new connection are
    the database's: the caller retries later."""
    kept = connection.connection is not None
    try:
        return _claim(generation_id)
    except (OperationalError, InterfaceError):
        if not kept:
            raise
        log.info("generation %s: the kept database connection failed; claiming anew", generation_id)
        connection.close()
        return _claim(generation_id)


def _finish(gen: Generation, state: str, reason: str = "", finish_reason: str = "") -> None:
    gen.state = state
    gen.reason = reason
    gen.finish_reason = finish_reason or gen.finish_reason
    gen.finished_at = timezone.now()
    gen.save()

    def announce() -> None:
        _announce_final(gen)
        generation_finished.send(sender=Generation, generation=gen)

    # Called inside _claim's transaction: a client that reads the generation on
    # hearing the final event must find it final, so announce after the commit
    # (the final event first, then the listeners, as in generate).
    transaction.on_commit(announce)


def _announce_final(gen: Generation) -> None:
    async_to_sync(get_channel_layer().group_send)(gen.group_name, final_event(gen))


# max_retries=None: a claim is retried for as long as the database is down (the
# retry's own max_retries=None would mean Celery's default, three).
@shared_task(name="inference.tasks.generate", bind=True, max_retries=None)
def generate(self, generation_id: int) -> None:
    try:
        claimed = _claim_on_a_live_connection(generation_id)
    except (OperationalError, InterfaceError) as exc:
        # Nothing was claimed: the generation is still queued in the database, and
        # would stay so with this message gone. Ask again later, until it answers.
        delay = min(CLAIM_RETRY_MAX_S, CLAIM_RETRY_S * 2 ** min(self.request.retries, 10))
        log.warning(
            "generation %s: the database is not answering (%s); trying again in %.0f s",
            generation_id,
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            delay,
        )
        raise self.retry(countdown=delay) from exc
    if claimed is None:
        return
    gen, prefix = claimed
    # Our own deadline, half a second inside Celery's soft time limit: the engine
    # enforces it even where that limit's signal would be lost (engine.py).
    deadline = time.monotonic() + settings.GENERATION_TIME_LIMIT_S - 0.5
    cancel = threading.Event()
    if gen.cancel_requested:  # read under the claim's lock
        cancel.set()
    publisher = Publisher(gen.pk, cancel, start_offset=len(prefix)).start()
    publisher.event({"type": "generation.started", "generation": gen.pk, "worker": gen.worker})

    def prompt_progress(evaluated: int, total: int) -> None:
        publisher.event(
            {
                "type": "generation.progress",
                "generation": gen.pk,
                "evaluated": evaluated,
                "total": total,
            }
        )

    stats = RunStats()
    text = prefix
    state, reason = Generation.DONE, ""
    n_ctx = gen.model.n_ctx
    flush_every = settings.GENERATION_FLUSH_INTERVAL_S
    try:
        with ResourceSampler(gpu_index=0 if gen.model.n_gpu_layers else None) as sampler:
            try:
                if not _engine_loaded(gen.model):
                    # A load takes seconds to minutes: stop requests, and the alive
                    # key that keeps the reaper away, must be served meanwhile.
                    publisher.watch_for_stop()
                engine = get_engine(gen.model)
                n_ctx = engine.n_ctx
                if gen.prompt_text:
                    prompt = engine.tokenize(gen.prompt_text + prefix)
                else:
                    prompt = engine.chat_prompt_tokens(gen.input_messages, assistant_prefix=prefix)
                # What runs beside the answer starts now, as the model starts: before
                # the prompt is ready, its Python (threads of this process) and its
                # database and Redis writes only delayed it (docs/benchmarks.md).
                publisher.watch_for_stop()
                if _heartbeat:
                    _heartbeat.report_soon(state=WorkerHeartbeat.BUSY, generation=gen.pk)
                next_flush = time.monotonic() + flush_every
                pieces = engine.stream(
                    prompt,
                    sampling_from(gen.params),
                    cancel,
                    stats,
                    prompt_progress,
                    deadline=deadline,
                )
                for piece in pieces:
                    text += piece
                    publisher.put(piece)
                    if time.monotonic() >= next_flush:
                        Generation.objects.filter(pk=gen.pk).update(
                            text=text, heartbeat_at=timezone.now()
                        )
                        next_flush = time.monotonic() + flush_every
                if stats.finish_reason == "cancelled":
                    state, reason = Generation.CANCELLED, "Stopped by request."
            except Cancelled:
                state, reason = Generation.CANCELLED, "Stopped during prompt evaluation."
                stats.finish_reason = "cancelled"
            except ContextOverflow as exc:
                state, reason = Generation.FAILED, str(exc)
            except ModelLoadError as exc:
                state, reason = Generation.FAILED, f"The model could not be loaded: {exc}"
            except DecodeError as exc:
                state, reason = Generation.FAILED, str(exc)
            except (SoftTimeLimitExceeded, TimeLimitExceeded):
                state = Generation.FAILED
                reason = f"Stopped by the time limit ({settings.GENERATION_TIME_LIMIT_S} s)."
            except MemoryError:
                state, reason = Generation.FAILED, "Out of memory while generating."
            except Exception as exc:  # noqa: BLE001 - any failure ends the generation with its reason
                log.exception("generation %s failed", gen.pk)
                state, reason = Generation.FAILED, f"{type(exc).__name__}: {exc}"
    finally:
        gen.text = text
        gen.first_token_at = _wall(stats.first_token)
        gen.finish_reason = stats.finish_reason
        gen.prompt_tokens, gen.completion_tokens = stats.prompt_tokens, stats.completion_tokens
        record = record_metrics(gen, stats, sampler.summary(), n_ctx=n_ctx)
        gen.metrics = record
        gen.state, gen.reason, gen.finished_at = state, reason, timezone.now()
        gen.save()
        # The final event goes out as soon as the answer and its metrics row are
        # committed; the listeners (usage rollups, Prometheus, jobs) run after it,
        # so a stop or an end of answer is not delayed by bookkeeping (the rollup
        # of a busy user's day takes tens of milliseconds). Pages that show those
        # records are eventually consistent by that much.
        publisher.close(final_event(gen))
        generation_finished.send(sender=Generation, generation=gen)
        redis_pool.client().delete(live_text_key(gen.pk), cancel_key(gen.pk))
        _save_context()
        if _heartbeat:
            ready = _engine is not None
            _heartbeat.report_soon(
                state=WorkerHeartbeat.READY if ready else WorkerHeartbeat.FAILED, generation=None
            )


def _save_context() -> None:
    """Between requests, keep this answer's context among the saved states, so that
    the next request, if it is for another conversation, starts evaluating at once."""
    if _engine is None:
        return
    try:
        _engine.save_context()
    except Exception:  # noqa: BLE001 - a lost saved state costs time, never an answer
        log.exception("could not save the context after an answer")


def _wall(monotonic_at: float | None):
    """Convert a monotonic instant of this run into wall-clock time."""
    if monotonic_at is None:
        return None
    return timezone.now() - timedelta(seconds=time.monotonic() - monotonic_at)


@shared_task(name="inference.tasks.reap_stale_generations")
def reap_stale_generations() -> int:
    """Fail running generations whose worker has not been heard from in a while.

    The broker redelivers a lost task after its visibility timeout; this catches the
    rest (say, a worker host that never came back) so nothing stays running forever.
    """
    cutoff = timezone.now() - timedelta(seconds=settings.GENERATION_STALE_AFTER_S)
    stale = Generation.objects.filter(state=Generation.RUNNING, heartbeat_at__lt=cutoff)
    count = 0
    client = redis_pool.client()
    for gen in stale:
        if client.exists(alive_key(gen.pk)):
            continue  # a long prompt evaluation: the publisher still says it is alive
        # The database has the text of the last flush; the user saw up to the live
        # text. Keep what they saw, or the final event would take words back.
        live = client.get(live_text_key(gen.pk))
        if live is not None and len(live.decode("utf-8", "replace")) > len(gen.text):
            gen.text = live.decode("utf-8", "replace")
        gen.state = Generation.FAILED
        gen.reason = f"The worker ({gen.worker}) stopped responding; the answer so far is kept."
        gen.finished_at = timezone.now()
        gen.save(update_fields=["text", "state", "reason", "finished_at"])
        _announce_final(gen)
        generation_finished.send(sender=Generation, generation=gen)
        count += 1
    return count
