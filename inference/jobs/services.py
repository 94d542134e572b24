"""Writes that create, run, advance and cancel jobs. Views, consumers, the signal
receiver and the beat task call these.

Every function takes keyword-only arguments and raises JobError with a message
that can be shown to the user as it is.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from inference.models import Generation, LanguageModel
from inference.quotas import QuotaExceeded, check_quota
from inference.services import clean_id, generation_enqueue, generation_stop, title_from
from inference.streams import announce as send_to_group
from mixtralweb import namespace
from mixtralweb.accounts import access

from . import batch_lines, planning
from .documents import DocumentError, clean_pasted_text, read_upload
from .models import BatchFile, Job, JobChunk
from .selectors import job_snapshot, unread_count

log = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 32768
INSTRUCTION_MAX_CHARS = 20_000
# A pass that failed (say, its worker died) is tried this many times in all.
PASS_MAX_ATTEMPTS = 3
# Jobs run with little randomness: a summary should not change from run to run.
PASS_PARAMS = {"temperature": 0.2, "top_p": 0.95, "seed": None}
# Drafts nobody ran or discarded are deleted after this long.
DRAFT_TTL = timedelta(days=1)


class JobError(ValueError):
    """A request that cannot be carried out; `field` names the form field at fault."""

    def __init__(self, message: str, code: str = "invalid", field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field


# --- reads used by the writes ---------------------------------------------------------
def get_job_for_user(user, job_id) -> Job:
    """The job if the user may see it (owner or team-mate); JobError otherwise."""
    job_id = clean_id(job_id)
    if job_id is None:
        raise JobError("Job not found.", code="not_found")
    jobs = access.jobs(user, Job.objects.select_related("model", "team").defer("document"))
    job = jobs.filter(pk=job_id).first()
    if job is None:
        raise JobError("Job not found.", code="not_found")
    return job


def _own_job_locked(user, job_id) -> Job:
    job = get_job_for_user(user, job_id)
    if not access.may_manage_job(user, job):
        raise JobError("Only the owner of a job may change it.", code="forbidden")
    return Job.objects.select_for_update().select_related("model").get(pk=job.pk)


# --- creating ------------------------------------------------------------------------
def _clean_max_tokens(value) -> int:
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise JobError("Maximum new tokens must be a whole number.", field="max_tokens") from None
    if not 1 <= value <= MAX_TOKENS_LIMIT:
        raise JobError(
            f"Maximum new tokens must be between 1 and {MAX_TOKENS_LIMIT}.", field="max_tokens"
        )
    return value


def _model(name: str | None) -> LanguageModel:
    from django.conf import settings

    model = LanguageModel.objects.filter(name=name or settings.DEFAULT_MODEL_NAME, enabled=True)
    model = model.first()
    if model is None:
        raise JobError(f"There is no model named {name!r}.", field="model")
    return model


def _count(user, model: LanguageModel, instruction: str, document: str) -> tuple[int, int]:
    """The document's tokens and the whole prompt's, as the worker will count them."""
    try:
        document_tokens = planning.count_text(model, document)
        prompt_tokens = planning.count_chat(model, planning.single_messages(instruction, document))
    except planning.PlanError as exc:  # no chat template: the user may pick another model
        raise JobError(f"{model.name} cannot count this document: {exc}", field="model") from None
    except (ValueError, OSError) as exc:  # the model's file is unreadable on this host
        log.warning("job draft: %s cannot count tokens: %s", model.name, exc)
        # llama.cpp's and the OS's words name the file: a server path is for staff only.
        why = (
            str(exc)
            if access.is_staff(user)
            else "its file cannot be read on this server; tell an administrator"
        )
        raise JobError(f"{model.name} cannot count this document: {why}", field="model") from None
    return document_tokens, prompt_tokens


def job_count(*, user, instruction: str, max_tokens, model_name: str, text: str) -> dict:
    """Pasted text counted as a draft would be, without saving anything: the new-job
    form shows it as the user types."""
    max_tokens = _clean_max_tokens(max_tokens)
    model = _model(model_name)
    try:
        document = clean_pasted_text(text)
    except DocumentError as exc:
        raise JobError(str(exc), code=exc.code, field="text") from None
    document_tokens, prompt_tokens = _count(user, model, (instruction or "").strip(), document)
    room = model.n_ctx - max_tokens
    return {
        "document_tokens": document_tokens,
        "prompt_tokens": prompt_tokens,
        "n_ctx": model.n_ctx,
        "room": room,
        "fits": prompt_tokens <= room,
    }


def job_draft(
    *,
    user,
    instruction: str,
    max_tokens: int,
    model_name: str | None = None,
    text: str = "",
    file_name: str = "",
    file_data: bytes | None = None,
    file_size: int | None = None,
    team=None,
    title: str = "",
) -> Job:
    """Read and count a document. The draft is not queued: the user sees its token
    count against the model's context, then runs or discards it."""
    instruction = (instruction or "").strip()
    if not instruction:
        raise JobError("Say what to do with the document.", code="empty", field="instruction")
    if len(instruction) > INSTRUCTION_MAX_CHARS:
        raise JobError(
            f"The instruction is {len(instruction):,} characters; the limit is "
            f"{INSTRUCTION_MAX_CHARS:,}. Put long material in the document.",
            field="instruction",
        )
    max_tokens = _clean_max_tokens(max_tokens)
    model = _model(model_name)
    if team is not None and not team.memberships.filter(user=user).exists():
        raise JobError("You are not in that team.", field="team")
    has_file = file_data is not None
    if has_file and (text or "").strip():
        raise JobError("Upload a file or paste text, not both.", field="document")
    try:
        if has_file:
            document = read_upload(file_name, file_data, size=file_size)
        else:
            document = clean_pasted_text(text)
    except DocumentError as exc:
        raise JobError(str(exc), code=exc.code, field="file" if has_file else "text") from None

    document_tokens, prompt_tokens = _count(user, model, instruction, document)
    title = title_from((title or "").strip() or file_name or instruction, max_chars=200)
    return Job.objects.create(
        user=user,
        team=team,
        model=model,
        title=title,
        instruction=instruction,
        document=document,
        document_name=(file_name or "")[:255],
        document_tokens=document_tokens,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        n_ctx=model.n_ctx,
    )


def job_discard(*, user, job_id) -> None:
    """Refuse a draft that does not fit (or that the user no longer wants)."""
    with transaction.atomic():
        job = _own_job_locked(user, job_id)
        if job.state != Job.DRAFT:
            raise JobError("Only a job that has not been queued can be discarded.", code="state")
        job.delete()


def job_submit(*, user, job_id, strategy: str) -> Job:
    """Queue a draft: in one pass if it fits the context, else by map-reduce when the
    user chose it. Never truncates.

    A big document takes seconds to split and count. That happens before the
    transaction: on SQLite a transaction holds the one write lock of the whole
    database, and every chat message waits for it. The rows go in afterwards, in one
    short transaction that checks again that the draft is still a draft."""
    job = get_job_for_user(user, job_id)
    if not access.may_manage_job(user, job):
        raise JobError("Only the owner of a job may change it.", code="forbidden")
    _check_draft(job)
    strategy = _clean_strategy(job, strategy)
    chunks = _plan_chunks(Job.objects.select_related("model").get(pk=job.pk), strategy)
    with transaction.atomic():
        job = _own_job_locked(user, job_id)
        _check_draft(job)
        try:
            check_quota(user=user, team=job.team, source="job")
        except QuotaExceeded as exc:
            raise JobError(str(exc), code="quota") from None
        JobChunk.objects.bulk_create(
            JobChunk(
                job=job, level=0, index=i, start=c.start, end=c.end, prompt_tokens=c.prompt_tokens
            )
            for i, c in enumerate(chunks)
        )
        job.strategy = strategy
        job.state = Job.QUEUED
        job.queued_at = timezone.now()
        job.save()
        _advance_locked(job)
        announce(job)
    return job


def _check_draft(job: Job) -> None:
    if job.state != Job.DRAFT:
        raise JobError("This job was already submitted.", code="state")


def _clean_strategy(job: Job, strategy: str) -> str:
    if strategy not in {Job.SINGLE, Job.MAP_REDUCE}:
        raise JobError("Choose one pass or map-reduce.", field="strategy")
    if job.fits:
        return Job.SINGLE
    if strategy == Job.SINGLE:
        raise JobError(
            f"The prompt is {job.prompt_tokens:,} tokens and {job.max_tokens:,} new tokens are "
            f"asked for: more than the {job.n_ctx:,}-token context. Choose map-reduce or "
            "discard the job.",
            code="too_long",
        )
    return strategy


def _plan_chunks(job: Job, strategy: str) -> list[planning.Chunk]:
    """The level-0 chunks: the whole document, or its map-reduce split (tokenized)."""
    if strategy == Job.SINGLE:
        return [planning.Chunk(0, len(job.document), job.prompt_tokens)]
    try:
        return planning.split_document(
            job.model, job.instruction, job.document, job.max_tokens, job.n_ctx
        )
    except planning.PlanError as exc:
        raise JobError(str(exc), code="cannot_split") from None


# --- running -------------------------------------------------------------------------
def _pass_messages(job: Job, chunk: JobChunk, level_answers: list[str] | None) -> list[dict]:
    if chunk.level == 0:
        part = job.document[chunk.start : chunk.end]
        if job.strategy == Job.SINGLE:
            return planning.single_messages(job.instruction, part)
        total = job.chunks.filter(level=0).count()
        return planning.map_messages(job.instruction, part, chunk.index + 1, total)
    return planning.combine_messages(job.instruction, level_answers[chunk.start : chunk.end])


def _start_pass(job: Job, chunk: JobChunk, level_answers: list[str] | None = None) -> bool:
    """Create the pass's generation, unless the owner's quota says not now: then the
    job waits, saying why, and the redrive (jobs_redrive, every minute) tries again.
    Every pass counts against the quotas like any other generation; its tokens are
    its Generation's. True if the pass was started."""
    batch = job.batch if job.strategy == Job.BATCH else None
    try:
        # A batch's lines count against its key's own limits too.
        api_key = batch.api_key if batch else None
        check_quota(user=job.user, team=job.team, api_key=api_key, source="job")
    except QuotaExceeded as exc:
        reason = f"Waiting for the quota: {exc} The job goes on by itself then."
        if job.reason != reason:
            job.reason = reason
            job.save(update_fields=["reason"])
        return False
    if job.reason:
        job.reason = ""
        job.save(update_fields=["reason"])
    if batch is not None:
        messages, params = batch_lines.line_request(job, chunk)
        gen = Generation.objects.create(
            user=job.user,
            model=job.model,
            source=Generation.SOURCE_BATCH,
            api_key_name=batch.api_key_name,
            input_messages=messages,
            params=params,
        )
    else:
        gen = Generation.objects.create(
            user=job.user,
            team=job.team,
            model=job.model,
            source=Generation.SOURCE_JOB,
            input_messages=_pass_messages(job, chunk, level_answers),
            params={**PASS_PARAMS, "max_tokens": job.max_tokens},
        )
    if not chunk.prompt_tokens and batch is None:  # a batch line left uncounted stays so
        chunk.prompt_tokens = planning.count_chat(job.model, gen.input_messages)
    chunk.generation = gen
    chunk.attempts += 1
    chunk.state = JobChunk.RUNNING
    chunk.save()
    chunk.generations.add(gen)
    # Enqueued by announce(), after the watchers hear of the pass: their sockets
    # then join its group before the worker can start streaming it.
    job.passes_to_enqueue = [*getattr(job, "passes_to_enqueue", []), gen]
    return True


def _finish_job(job: Job, state: str, reason: str = "", result: str = "") -> None:
    job.state = state
    job.reason = reason
    job.result = result
    job.finished_at = timezone.now()
    job.save()


def _plan_next_level(job: Job, answers: list[str], level: int) -> list[JobChunk]:
    groups = planning.group_answers(job.model, answers, job.max_tokens, job.n_ctx, job.instruction)
    chunks = []
    for index, (start, end) in enumerate(groups):
        chunk = JobChunk(job=job, level=level, index=index, start=start, end=end)
        if end - start == 1 and len(groups) > 1:
            # One answer alone needs no combining: it goes up a level as it is.
            chunk.state, chunk.answer = JobChunk.DONE, answers[start]
        chunks.append(chunk)
    return JobChunk.objects.bulk_create(chunks)


def _advance_locked(job: Job) -> None:
    """Move a locked, active job one step on, from what the database says. Safe to
    call any number of times: a step already taken is not taken again."""
    if job.strategy == Job.BATCH:
        _advance_batch_locked(job)
        return
    while job.state in Job.ACTIVE_STATES:
        chunks = list(job.chunks.select_related("generation").order_by("level", "index"))
        last_level = chunks[-1].level
        answers_by_level: dict[int, list[str]] = {}
        waiting = False
        for chunk in chunks:
            if chunk.state == JobChunk.DONE:
                answers_by_level.setdefault(chunk.level, []).append(chunk.answer)
                continue
            gen = chunk.generation
            if gen is None:
                _start_pass(job, chunk, answers_by_level.get(chunk.level - 1))
                waiting = True  # for the pass, or for the quota
                break
            if not gen.is_final:
                waiting = True
                break
            if gen.state == Generation.DONE:
                chunk.state, chunk.answer = JobChunk.DONE, gen.text
                chunk.save(update_fields=["state", "answer"])
                answers_by_level.setdefault(chunk.level, []).append(chunk.answer)
                if job.state == Job.QUEUED:
                    job.state = Job.RUNNING
                    job.save(update_fields=["state"])
                continue
            if gen.state == Generation.CANCELLED:
                _finish_job(job, Job.CANCELLED, gen.reason or "A pass was stopped.")
                return
            if chunk.attempts < PASS_MAX_ATTEMPTS:
                log.info("job %s: retrying pass %s after: %s", job.pk, chunk, gen.reason)
                _start_pass(job, chunk, answers_by_level.get(chunk.level - 1))
                waiting = True
                break
            chunk.state = JobChunk.FAILED
            chunk.save(update_fields=["state"])
            _finish_job(
                job,
                Job.FAILED,
                f"{_pass_name(job, chunk)} failed {chunk.attempts} times; the last time: "
                f"{gen.reason or 'no reason given'}",
            )
            return
        if waiting:
            return
        top = [c for c in chunks if c.level == last_level]
        if len(top) == 1:
            _finish_job(job, Job.DONE, result=top[0].answer)
            return
        _plan_next_level(job, answers_by_level[last_level], last_level + 1)
        # Loop: start the first pass of the new level.


def _advance_batch_locked(job: Job) -> None:
    """A batch's step: record the lines whose generation ended, retry a failed one
    (PASS_MAX_ATTEMPTS in all, as job passes), start the next lines while fewer than
    the model's job_sequences are in flight, and end the batch when no line is left
    (or, once cancelled, none is in flight). A line that fails for good is an error
    line; it does not stop the others."""
    if job.state not in Job.ACTIVE_STATES:
        return
    in_flight, limit = 0, max(1, job.model.job_sequences)
    may_start = not job.cancel_requested
    started_any = False
    for chunk in job.chunks.select_related("generation").order_by("index"):
        if chunk.state in (JobChunk.DONE, JobChunk.FAILED):
            started_any = started_any or chunk.generation_id is not None
            continue
        gen = chunk.generation
        if gen is not None:
            started_any = started_any or gen.state != Generation.QUEUED
            if not gen.is_final:
                in_flight += 1
                continue
            if gen.state == Generation.DONE:
                chunk.state = JobChunk.DONE
                chunk.save(update_fields=["state"])
                continue
            if gen.state == Generation.CANCELLED and job.cancel_requested:
                continue  # stopped by the batch's cancel: an unanswered line
            if gen.state == Generation.CANCELLED or chunk.attempts >= PASS_MAX_ATTEMPTS:
                chunk.state = JobChunk.FAILED
                what = "was stopped" if gen.state == Generation.CANCELLED else "failed"
                chunk.answer = json.dumps(
                    batch_lines.error(
                        f"generation_{gen.state}",
                        f"The generation {what} ({chunk.attempts} attempt(s)): "
                        f"{gen.reason or 'no reason given'}",
                    )
                )
                chunk.save(update_fields=["state", "answer"])
                continue
            log.info("batch %s: retrying line %s after: %s", job.pk, chunk.index, gen.reason)
        if may_start and in_flight < limit:
            if _start_pass(job, chunk):
                in_flight += 1
            else:
                may_start = False  # the quota: the redrive tries again
    if in_flight == 0 and (job.cancel_requested or not _batch_lines_left(job)):
        _finish_batch(job)
    elif started_any and job.state == Job.QUEUED:
        job.state = Job.RUNNING
        job.save(update_fields=["state"])


def _batch_lines_left(job: Job) -> bool:
    return job.chunks.exclude(state__in=[JobChunk.DONE, JobChunk.FAILED]).exists()


def _finish_batch(job: Job) -> None:
    """Write the output and error files, then end the batch: cancelled if it was,
    failed if no line was a valid request, else done (completed)."""
    answered, unanswered = batch_lines.write_files(job, job.batch)
    never_valid = not job.chunks.exclude(state=JobChunk.FAILED, generation__isnull=True).exists()
    summary = (
        f"{answered + unanswered} request(s): {answered} answered (output file "
        f"{_file_id(job.batch.output_file)}), {unanswered} without an answer (error file "
        f"{_file_id(job.batch.error_file)}). GET /v1/files/{{id}}/content downloads them."
    )
    if job.cancel_requested:
        _finish_job(job, Job.CANCELLED, job.reason or "Cancelled.", result=summary)
    elif never_valid:
        _finish_job(
            job, Job.FAILED, "No line of the input file is a valid request.", result=summary
        )
    else:
        _finish_job(job, Job.DONE, result=summary)


def _file_id(file: BatchFile | None) -> str:
    return f"file-{file.pk}" if file else "none"


def _pass_name(job: Job, chunk: JobChunk) -> str:
    if job.strategy == Job.BATCH:
        return f"Request {chunk.index + 1}"
    if job.strategy == Job.SINGLE:
        return "The pass"
    if chunk.level == 0:
        return f"Chunk {chunk.index + 1}"
    return f"Combine pass {chunk.level}.{chunk.index + 1}"


def job_advance(*, job_id: int) -> Job | None:
    """Take the job's next step if its current pass has finished (idempotent)."""
    with transaction.atomic():
        job = Job.objects.select_for_update().select_related("model").filter(pk=job_id).first()
        if job is None:
            return None
        before = job.state
        if job.state in Job.ACTIVE_STATES:
            _advance_locked(job)
        if job.state != before or job.state in Job.ACTIVE_STATES:
            announce(job)
    return job


def job_cancel(*, user, job_id) -> Job:
    """Cancel the job now, and ask the worker to stop its running pass."""
    with transaction.atomic():
        job = _own_job_locked(user, job_id)
        if job.state == Job.DRAFT:
            raise JobError("This job was never queued; discard it instead.", code="state")
        if job.is_final:
            return job
        job.cancel_requested = True
        if job.strategy == Job.BATCH:
            # Cancelling: the lines in flight are stopped below; the batch ends, with
            # the files of what it answered, when the last of them has (or now).
            job.reason = f"Cancelled by {user.get_username()}."
            job.save(update_fields=["cancel_requested", "reason"])
            _advance_locked(job)
        else:
            _finish_job(job, Job.CANCELLED, f"Cancelled by {user.get_username()}.")
        running = list(
            Generation.objects.filter(
                job_chunk__job=job, state__in=[Generation.QUEUED, Generation.RUNNING]
            ).values_list("pk", flat=True)
        )
        announce(job)
    for gen_id in running:
        generation_stop(user=job.user, generation_id=gen_id)
    return job


def job_mark_seen(*, user, job_id) -> None:
    Job.objects.filter(pk=job_id, user=user, seen_at__isnull=True).exclude(
        state__in=[Job.DRAFT, Job.QUEUED, Job.RUNNING]
    ).update(seen_at=timezone.now())


def jobs_redrive() -> int:
    """Advance every active job whose pass ended without moving it on (a missed
    signal, a crash between steps), and delete stale drafts. Returns the number of
    active jobs looked at."""
    Job.objects.filter(state=Job.DRAFT, created_at__lt=timezone.now() - DRAFT_TTL).delete()
    active = list(Job.objects.filter(state__in=Job.ACTIVE_STATES).values_list("pk", flat=True))
    for job_id in active:
        job_advance(job_id=job_id)
    return len(active)


# --- telling the browsers --------------------------------------------------------------
def announce(job: Job) -> None:
    """After the commit, send the job's new state to its watchers, tell the owner
    when it has finished, then enqueue the passes it started."""
    job_id, user_id, final = job.pk, job.user_id, job.is_final
    passes, job.passes_to_enqueue = getattr(job, "passes_to_enqueue", []), []

    def send():
        fresh = Job.objects.select_related("model").defer("document").get(pk=job_id)
        snapshot = job_snapshot(fresh)
        send_to_group(namespace.job_group(job_id), {**snapshot, "type": "job.progress"})
        if final:
            send_to_group(
                namespace.user_jobs_group(user_id),
                {
                    "type": "job.finished",
                    "job": job_id,
                    "title": str(fresh),
                    "state": fresh.state,
                    "reason": fresh.reason,
                    "url": f"/jobs/{job_id}/",
                    "unread": unread_count(user_id),
                },
            )

    # A failed announcement must not keep the passes from being enqueued.
    transaction.on_commit(send, robust=True)
    for gen in passes:
        generation_enqueue(gen)


def batch_start(*, job: Job) -> None:
    """Start a batch created in the caller's transaction (its first lines), and tell
    its watchers once that commits."""
    _advance_locked(job)
    announce(job)
