"""Celery tasks that run the model, and the reapers that keep generations moving.

A generate task receives only a Generation id and is idempotent by it: a generation
already final is left alone, one already claimed by another worker too, and a
redelivered one (its worker died) continues from the text the user already saw.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

from celery import shared_task
from celery.exceptions import Reject
from celery.signals import task_prerun, worker_init, worker_shutdown
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections
from django.utils import timezone
from redis.exceptions import RedisError

from mixtralweb import namespace

from . import broker, status, streams, tool_calls
from .engine import BACKGROUND, INTERACTIVE, ContextOverflow, DecodeError, Request, Sampling
from .models import Generation
from .selectors import announce_final
from .serving import ModelServer, worker_name
from .signals import generation_ended, generation_finished, generation_started
from .tokens import tokenizer_for
from .workers import live_workers

log = logging.getLogger(__name__)

# A generation whose worker died this many times fails instead of being retried.
MAX_ATTEMPTS = 2
# A job pass that finds its model's job sequences taken asks again after this long.
JOB_DEFER_S = 3
# A task that finds the database down asks again after this long, then twice as long
# after each failure, up to CLAIM_RETRY_MAX_S.
CLAIM_RETRY_S = 1.0
CLAIM_RETRY_MAX_S = 30.0


@worker_init.connect
def _load_the_model(sender=None, **_kwargs) -> None:
    """A model worker (WORKER_MODEL set by `manage.py modelworker`) loads its model
    before it takes a task: the first user does not wait for the load. The sender is
    Celery's worker, whose pool size the heartbeat reports among the options in force."""
    name = os.environ.get("WORKER_MODEL")
    if name:
        ModelServer.start(name, pool_threads=getattr(sender, "concurrency", None))


@worker_shutdown.connect
def _say_goodbye(**_kwargs) -> None:
    server = ModelServer.current()
    if server is not None:
        server.stop()


@task_prerun.connect
def _database_connection_for_the_task(**_kwargs) -> None:
    """Keep the thread's connection between tasks while it is usable and younger
    than CONN_MAX_AGE: Django's rule for requests (CELERY_DB_REUSE_MAX)."""
    close_old_connections()


def sampling_from(params: dict, tool_format: str | None = None) -> Sampling:
    """tool_format: the call format of the model's template (tool_calls.grammar)."""
    grammar, triggers = params.get("grammar") or None, ()
    if grammar is None:
        grammar, triggers = tool_calls.grammar(params, tool_format)
    return Sampling(
        max_tokens=int(params.get("max_tokens", 512)),
        temperature=float(params.get("temperature", 0.7)),
        top_p=float(params.get("top_p", 0.95)),
        seed=params.get("seed"),
        stop=tuple(params.get("stop") or ()),
        grammar=grammar,
        grammar_triggers=triggers,
    )


def enqueue(generation: Generation) -> None:
    """Send the generation to its model's queue (call after its row is committed)."""
    queue = (
        generation.model.bulk_queue_name
        if generation.is_background
        else generation.model.queue_name
    )
    generate.apply_async(
        args=[generation.pk], kwargs={"deployment": namespace.namespace()}, queue=queue
    )
    if not generation.is_background:
        status.announce(generation.model)  # one more waiting (jobs and batches wait behind)


@shared_task(name="inference.tasks.generate", bind=True, max_retries=None)
def generate(self, generation_id: int, deployment: str | None = None) -> None:
    if deployment is not None and deployment != namespace.namespace():
        # Another deployment's task on a queue of ours (two deployments set the same
        # REDIS_NAMESPACE): leave it for its owner, after a pause so as not to spin.
        log.error(
            "generation %s belongs to deployment %r, not this one (%r): left in the queue",
            generation_id,
            deployment,
            namespace.namespace(),
        )
        time.sleep(1)
        raise Reject(requeue=True)
    try:
        gen = Generation.objects.select_related("model").filter(pk=generation_id).first()
    except (OperationalError, InterfaceError) as exc:
        raise _retry_later(self, generation_id, exc) from exc
    if gen is None:
        log.error("generation %s is not in this deployment's database: dropped", generation_id)
        return
    if gen.is_final:
        return
    server = ModelServer.current()
    if server is None or server.model.name != gen.model.name:
        reason = f"No worker for the model {gen.model.name!r} took this answer."
        log.error("generation %s reached a worker that does not serve its model", gen.pk)
        _fail_unstarted(gen, reason)
        return
    if server.error:
        _fail_unstarted(gen, f"The model could not be loaded: {server.error}")
        return
    job = gen.is_background
    if job and not server.engine.reserve_job():
        # Every sequence jobs may use is taken: hold no thread, ask again later.
        raise self.retry(countdown=JOB_DEFER_S)
    released = not job

    def release_job() -> None:
        # Once: when the engine is done with it, before the final writes, whose
        # generation_finished starts the job's next pass (which would otherwise find
        # the place still held and wait JOB_DEFER_S); or at the latest here.
        nonlocal released
        if not released:
            released = True
            server.engine.release_job()

    try:
        Run(gen, server, engine_done=release_job).run()
    except DatabaseDown as exc:
        # Nothing was claimed: the generation is still queued in the database.
        raise _retry_later(self, generation_id, exc.__cause__) from exc
    finally:
        release_job()


class DatabaseDown(Exception):
    """The database did not answer before the generation was claimed."""


def _retry_later(task, generation_id: int, exc: Exception):
    """A retry of the task after a wait that doubles up to CLAIM_RETRY_MAX_S, for as
    long as the database is down (max_retries=None)."""
    delay = min(CLAIM_RETRY_MAX_S, CLAIM_RETRY_S * 2 ** min(task.request.retries, 10))
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    log.warning(
        "generation %s: the database is not answering (%s); trying again in %.0f s",
        generation_id,
        first_line,
        delay,
    )
    return task.retry(countdown=delay)


def _fail_unstarted(gen: Generation, reason: str) -> None:
    """Fail a generation that never reached the model, if nobody else ended it."""
    updated = Generation.objects.filter(
        pk=gen.pk, state__in=[Generation.QUEUED, Generation.RUNNING]
    ).update(state=Generation.FAILED, reason=reason, finished_at=timezone.now())
    if updated:
        gen.refresh_from_db()
        announce_final(gen)
        generation_finished.send(sender=Generation, generation=gen)


class Run:
    """One generation through the engine, in its task's thread."""

    def __init__(self, gen: Generation, server: ModelServer, engine_done=lambda: None):
        self.gen = gen
        self.server = server
        self.engine = server.engine
        self.engine_done = engine_done  # called when the engine has let it go
        self.text = ""
        self.started = False

    def run(self) -> None:
        gen = self.gen
        # A queued generation with text continues that answer (services.chat_continue).
        prefix = gen.text
        if gen.state == Generation.RUNNING:
            if streams.is_alive(gen):
                return  # a live worker holds it: this is a stale copy of its task
            # Redelivered: the worker that had it died. Continue what the user saw.
            if not gen.resume(worker_name(), streams.live_text(gen), MAX_ATTEMPTS):
                if gen.is_final:
                    announce_final(gen)
                    generation_finished.send(sender=Generation, generation=gen)
                return
            prefix = gen.text
            self.started = True
        self.text = prefix
        try:
            prompt = self._prompt(prefix)
            sampling = sampling_from(gen.params, tokenizer_for(gen.model.path).tool_format)
        except (ContextOverflow, ValueError, OSError) as exc:
            self._end_unstarted(str(exc))
            return
        request = Request(
            prompt=prompt,
            sampling=sampling,
            tenant=gen.tenant,
            priority=BACKGROUND if gen.is_background else INTERACTIVE,
            label=str(gen.pk),
        )
        stream = streams.GenerationStream(gen, text_before=prefix)
        stream.watch_for_stop(lambda: self.engine.cancel(request))
        if gen.cancel_requested:
            request.cancel.set()
        self.server.hold(gen.pk)
        try:
            try:
                self.engine.submit(request)
                error = self._follow(request, stream)
            finally:
                self.server.stopped(gen.pk)
                self.engine_done()
            if self.started:
                self._finish(request, stream, error)
            else:
                stream.close(None)
                if error is not None:
                    self._end_unstarted(str(error))
        finally:
            # Held until its last write (the final state, metrics, usage rollups):
            # a worker that reports nothing held has nothing of it left to write.
            self.server.release(gen.pk)

    def _prompt(self, prefix: str) -> list[int]:
        gen = self.gen
        tokenizer = tokenizer_for(gen.model.path)
        if gen.prompt_text:
            return tokenizer.tokenize(gen.prompt_text + prefix)
        return tokenizer.chat_tokens(
            gen.input_messages,
            assistant_prefix=prefix,
            tools=tool_calls.tool_defs(gen.params),
        )

    def _follow(self, request: Request, stream: streams.GenerationStream) -> Exception | None:
        """Stream the request's events until it ends; returns its error, if any."""
        gen = self.gen
        flush_every = settings.GENERATION_FLUSH_INTERVAL_S
        next_flush = time.monotonic() + flush_every
        while True:
            kind, value = request.events.get()
            if kind == "admitted":
                self._admitted(request, stream)
            elif kind == "progress":
                evaluated, total = value
                stream.event(
                    {
                        "type": "generation.progress",
                        "generation": gen.pk,
                        "evaluated": evaluated,
                        "total": total,
                    }
                )
            elif kind == "text":
                self.text += value
                stream.put(value)
                if time.monotonic() >= next_flush:
                    next_flush = time.monotonic() + flush_every
                    try:
                        # Not the answer of a conversation deleted meanwhile.
                        Generation.objects.filter(pk=gen.pk).exclude(
                            pk__in=Generation.objects.of_deleted_conversations()
                        ).update(text=self.text, heartbeat_at=timezone.now())
                    except (OperationalError, InterfaceError):
                        log.warning("generation %s: text not flushed (database down)", gen.pk)
            elif kind == "end":
                return value

    @staticmethod
    def _drain(request: Request) -> None:
        while request.events.get()[0] != "end":
            pass

    def _admitted(self, request: Request, stream: streams.GenerationStream) -> None:
        gen = self.gen
        if not self.started:
            try:
                claimed = gen.claim(worker_name())
            except (OperationalError, InterfaceError) as exc:
                self.engine.cancel(request)
                self._drain(request)
                raise DatabaseDown() from exc
            if not claimed:
                # Stopped while it waited, or another worker has it: let it go.
                self.engine.cancel(request)
                return
            self.started = True
        request.deadline = time.monotonic() + settings.GENERATION_TIME_LIMIT_S
        self.server.started(gen.pk)
        stream.open()
        stream.event({"type": "generation.started", "generation": gen.pk, "worker": gen.worker})
        generation_started.send(sender=Generation, generation=gen)

    def _finish(self, request: Request, stream, error: Exception | None) -> None:
        gen, stats = self.gen, request.stats
        state, reason = Generation.DONE, ""
        if error is not None:
            state, reason = Generation.FAILED, str(error)
            if not isinstance(error, (ContextOverflow, DecodeError)):
                reason = f"{type(error).__name__}: {error}"
        elif stats.finish_reason == "cancelled":
            state = Generation.CANCELLED
            reason = (
                "Stopped by request."
                if stats.first_token is not None
                else "Stopped during prompt evaluation."
            )
        elif stats.finish_reason == "time_limit":
            state = Generation.FAILED
            reason = f"Stopped by the time limit ({settings.GENERATION_TIME_LIMIT_S} s)."
        gen.text = self.text
        gen.first_token_at = _wall(stats.first_token)
        _while_the_database_is_down(lambda: gen.finish(state, reason, stats=stats), gen.pk)
        # What it cost is recorded before the final event, which carries it; the
        # other listeners (usage rollups, jobs) run after it.
        generation_ended.send(
            sender=Generation, generation=gen, stats=stats, n_ctx=self.engine.n_ctx
        )
        announce_final(gen, stream)
        generation_finished.send(sender=Generation, generation=gen)
        streams.forget_live_text(gen)

    def _end_unstarted(self, reason: str) -> None:
        if self.started:
            self.gen.finish(Generation.FAILED, reason)
            announce_final(self.gen)
            generation_finished.send(sender=Generation, generation=self.gen)
        else:
            _fail_unstarted(self.gen, reason)


def _while_the_database_is_down(save, generation_id: int, give_up_s: float = 300) -> None:
    """Save an answer's end, waiting for a database that is down (for a while): the
    text is only in this process until it is written."""
    deadline = time.monotonic() + give_up_s
    delay = CLAIM_RETRY_S
    while True:
        try:
            save()
            return
        except (OperationalError, InterfaceError):
            if time.monotonic() > deadline:
                raise
            log.warning("generation %s: its end not saved yet (database down)", generation_id)
            time.sleep(delay)
            delay = min(CLAIM_RETRY_MAX_S, delay * 2)


def _wall(monotonic_at: float | None):
    """Convert a monotonic instant of this process into wall-clock time."""
    if monotonic_at is None:
        return None
    return timezone.now() - timedelta(seconds=time.monotonic() - monotonic_at)


@shared_task(name="inference.tasks.reap_stale_generations")
def reap_stale_generations() -> dict:
    """Running generations whose worker is gone continue elsewhere, or fail with why.

    A worker is gone when its heartbeat has expired (a killed process, a host that
    never came back), or when it has not touched the generation for
    GENERATION_STALE_AFTER_S and holds it no more. The broker would redeliver its
    tasks only after the visibility timeout; instead the generation is sent again
    at once to continue from the text the user saw, if another worker serves its
    model and it has not been tried MAX_ATTEMPTS times; else it fails, keeping that
    text, so nothing stays running forever."""
    cutoff = timezone.now() - timedelta(seconds=settings.GENERATION_STALE_AFTER_S)
    try:
        workers = live_workers()
    except RedisError:
        return {"continued": 0, "failed": 0}  # nothing can be told without Redis
    alive_workers = {f"{w['host']}:{w['pid']}" for w in workers}
    serving = {w["model"] for w in workers if w["state"] in ("ready", "busy")}
    continued = failed = 0
    running = Generation.objects.filter(state=Generation.RUNNING).select_related("model")
    for gen in running:
        try:
            holder_alive = gen.worker in alive_workers
            if holder_alive and (gen.heartbeat_at is None or gen.heartbeat_at >= cutoff):
                continue
            if holder_alive and streams.is_alive(gen):
                continue  # a long prompt evaluation: its worker still holds it
            seen = streams.live_text(gen)
        except RedisError:
            break
        if gen.attempts < MAX_ATTEMPTS and gen.model.name in serving and not holder_alive:
            streams.forget_alive(gen)  # its holder's key, until it expires
            enqueue(gen)  # Run.run resumes it from the text the user saw
            continued += 1
            continue
        # Keep what the user saw, or the final event would take words back.
        if seen is not None and len(seen) > len(gen.text):
            gen.text = seen
        reason = (
            f"The worker stopped during this answer {gen.attempts} times; "
            "it was not tried again; the answer so far is kept."
            if gen.attempts >= MAX_ATTEMPTS
            else f"The worker ({gen.worker}) stopped responding; the answer so far is kept."
        )
        gen.finish(Generation.FAILED, reason)
        announce_final(gen)
        generation_finished.send(sender=Generation, generation=gen)
        failed += 1
    # A worker that died said nothing: its model's status changes here.
    status.announce_all()
    return {"continued": continued, "failed": failed}


# Re-sent at most this many times by the reaper before it fails with the reason.
REQUEUE_MAX = 3


@shared_task(name="inference.tasks.requeue_stranded_generations")
def requeue_stranded_generations() -> dict:
    """Queued generations whose task is gone are sent again, or failed with why.

    A task can be lost between the commit and the broker (Redis was down when it was
    sent), inside the broker (a Redis without persistence restarted), or with a
    worker killed while the task waited in its pool. A generation queued longer than
    GENERATION_STRANDED_AFTER_S that no live worker holds and whose task is not in
    its queue is sent again; after REQUEUE_MAX times, or if its model is no longer
    enabled, it fails with the reason. Sending twice is harmless: the task is
    idempotent by the generation's id (only one claim wins)."""
    cutoff = timezone.now() - timedelta(seconds=settings.GENERATION_STRANDED_AFTER_S)
    queued = list(
        Generation.objects.filter(state=Generation.QUEUED, queued_at__lt=cutoff).select_related(
            "model"
        )
    )
    if not queued:
        return {"requeued": 0, "failed": 0}
    held = {gen_id for worker in live_workers() for gen_id in worker.get("held", ())}
    waiting = broker.waiting_generations({gen.model.name for gen in queued})
    requeued = failed = 0
    for gen in queued:
        if gen.pk in held or gen.pk in waiting:
            continue
        if not gen.model.enabled:
            reason = f"The model {gen.model.name!r} was disabled before this answer started."
        elif broker.count_requeue(gen) > REQUEUE_MAX:
            reason = f"Its task was lost {REQUEUE_MAX} times; it was not sent again."
        else:
            enqueue(gen)
            requeued += 1
            continue
        _fail_unstarted(gen, reason)
        failed += 1
    return {"requeued": requeued, "failed": failed}
