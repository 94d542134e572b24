"""OpenAI's Files and Batches APIs on the job machinery (docs/jobs.md, docs/api.md).

A batch is a Job whose strategy is "batch": its document is the input file, and each
line is a JobChunk, one generation at job priority on the model's bulk queue. Lines
are checked and counted when the batch is created, as the endpoint checks a request;
a refused line is an error line and the others run. The job's redrive, cancel and
progress are the batch's. Every function raises ApiError (OpenAI's error shapes).
"""

from __future__ import annotations

import json

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from inference.models import LanguageModel
from inference.openai_api.errors import ApiError, bad_request, rate_limited
from inference.quotas import QuotaExceeded, check_quota
from inference.services import title_from
from mixtralweb.accounts.models import ApiKey

from . import batch_lines, services
from .models import Batch, BatchFile, Job, JobChunk

COMPLETION_WINDOWS = ("24h",)


def _not_found(what: str, given) -> ApiError:
    return ApiError(404, f"No {what} with id {given!r}.", code="not_found")


def _pk(given, prefix: str) -> int | None:
    if isinstance(given, str) and given.startswith(prefix) and given[len(prefix) :].isdigit():
        return int(given[len(prefix) :])
    return None


# --- files ----------------------------------------------------------------------------
def file_create(*, user, upload, purpose) -> BatchFile:
    """Store an uploaded batch input file: purpose "batch", UTF-8 JSONL (a JSON object
    on every non-blank line), within the size and line limits."""
    if purpose != BatchFile.BATCH:
        raise bad_request('purpose must be "batch": the only files this server takes.', "purpose")
    if upload is None:
        raise bad_request("file is required: the JSONL input of a batch.", "file")
    limit = settings.BATCH_FILE_MAX_BYTES
    if upload.size > limit:
        raise bad_request(
            f"The file is {upload.size:,} bytes; the limit is {limit:,}.", "file", "file_too_large"
        )
    data = upload.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("The file is not UTF-8 text: it must be JSONL.", "file") from None
    spans = batch_lines.split_lines(text)
    if not spans:
        raise bad_request("The file has no lines: it must be JSONL, one request a line.", "file")
    if len(spans) > settings.BATCH_MAX_LINES:
        raise bad_request(
            f"The file has {len(spans):,} lines; a batch takes at most "
            f"{settings.BATCH_MAX_LINES:,}.",
            "file",
        )
    for number, (start, end) in enumerate(spans, 1):
        try:
            line = json.loads(text[start:end])
        except ValueError:
            line = None
        if not isinstance(line, dict):
            raise bad_request(
                f"Line {number} is not a JSON object: the file must be JSONL, one request "
                "object a line.",
                "file",
            )
    name = (getattr(upload, "name", "") or "batch.jsonl")[:255]
    return batch_lines.store(user, name, BatchFile.BATCH, data)


def get_file(user, file_id) -> BatchFile:
    """The user's file (any of their keys'); 404 for another user's, as for none."""
    pk = _pk(file_id, "file-")
    file = BatchFile.objects.filter(pk=pk, user=user).first() if pk else None
    if file is None:
        raise _not_found("file", file_id)
    return file


def file_object(file: BatchFile) -> dict:
    return {
        "id": f"file-{file.pk}",
        "object": "file",
        "bytes": file.bytes,
        "created_at": int(file.created_at.timestamp()),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


# --- batches --------------------------------------------------------------------------
def _clean_metadata(metadata):
    if metadata is None:
        return None
    if (
        not isinstance(metadata, dict)
        or len(metadata) > 16
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise bad_request("metadata must be an object of up to 16 strings.", "metadata")
    return metadata


def batch_create(*, key: ApiKey, body: dict) -> Job:
    """Check the request and every line of its input file, count each line's prompt
    against the model's context, check the quotas, and queue the batch."""
    for name in body:
        if name not in {"input_file_id", "endpoint", "completion_window", "metadata"}:
            raise bad_request(f"Unrecognized request field for this endpoint: {name}.", name)
    if body.get("endpoint") != batch_lines.ENDPOINT:
        raise bad_request(
            f"endpoint must be {batch_lines.ENDPOINT!r}: the only one batches run.", "endpoint"
        )
    if body.get("completion_window") not in COMPLETION_WINDOWS:
        raise bad_request(
            f"completion_window must be one of: {', '.join(COMPLETION_WINDOWS)}.",
            "completion_window",
        )
    metadata = _clean_metadata(body.get("metadata"))
    input_file = get_file(key.user, body.get("input_file_id"))
    if input_file.purpose != BatchFile.BATCH:
        raise bad_request(
            f"file-{input_file.pk} is a batch's output, not an input file.", "input_file_id"
        )
    with input_file.content.open("rb") as stored:
        text = stored.read().decode("utf-8")

    # Counting takes a while on a big file: before the transaction, as job_submit.
    seen, models = set(), {}
    lines = [
        batch_lines.read_line(text, s, e, seen, models) for s, e in batch_lines.split_lines(text)
    ]
    valid = [line for line in lines if line.error is None]
    model = valid[0].model if valid else _any_model(models)
    for line in valid[1:]:
        if line.model != model:
            line.error = batch_lines.error(
                "model_mismatch",
                f"Every line of a batch must use the same model: the first valid line uses "
                f"{model.name!r}, this one {line.model.name!r}.",
            )
    valid = [line for line in lines if line.error is None]
    with transaction.atomic():
        try:
            check_quota(user=key.user, api_key=key, source="job")
        except QuotaExceeded as exc:
            raise rate_limited(str(exc), exc.retry_after_s) from None
        job = Job.objects.create(
            user=key.user,
            model=model,
            title=title_from(f"API batch: {input_file.filename}", max_chars=200),
            instruction=f"{len(lines)} request(s) to {batch_lines.ENDPOINT}",
            document=text,
            document_name=input_file.filename,
            document_tokens=sum(line.prompt_tokens for line in valid),
            prompt_tokens=max((line.prompt_tokens for line in valid), default=0),
            max_tokens=max((line.parsed.params["max_tokens"] for line in valid), default=0),
            n_ctx=model.n_ctx,
            strategy=Job.BATCH,
            state=Job.QUEUED,
            queued_at=timezone.now(),
        )
        JobChunk.objects.bulk_create(
            JobChunk(
                job=job,
                index=i,
                start=line.start,
                end=line.end,
                prompt_tokens=line.prompt_tokens,
                state=JobChunk.PENDING if line.error is None else JobChunk.FAILED,
                answer="" if line.error is None else json.dumps(line.error),
            )
            for i, line in enumerate(lines)
        )
        Batch.objects.create(
            job=job,
            api_key=key,
            api_key_name=key.name,
            input_file=input_file,
            endpoint=batch_lines.ENDPOINT,
            completion_window=body["completion_window"],
            metadata=metadata,
        )
        services.batch_start(job=job)
    return job


def _any_model(models: dict):
    """A batch none of whose lines is valid still names a model: the first that
    exists, else the default (it runs nothing; it ends failed with its error file)."""
    found = next((m for m in models.values() if not isinstance(m, ApiError)), None)
    found = found or LanguageModel.objects.filter(name=settings.DEFAULT_MODEL_NAME).first()
    found = found or LanguageModel.objects.first()
    if found is None:
        raise bad_request("No model is registered on this server.", "input_file_id")
    return found


def get_batch(user, batch_id) -> Job:
    """The user's batch; 404 for another user's, as for none."""
    pk = _pk(batch_id, "batch_")
    job = (
        Job.objects.select_related("batch", "model")
        .defer("document")
        .filter(pk=pk, user=user, strategy=Job.BATCH)
        .first()
        if pk
        else None
    )
    if job is None:
        raise _not_found("batch", batch_id)
    return job


def batch_cancel(*, user, batch_id) -> Job:
    job = get_batch(user, batch_id)
    try:
        services.job_cancel(user=user, job_id=job.pk)
    except services.JobError as exc:  # not found or not the owner's: as for none
        raise _not_found("batch", batch_id) from exc
    return get_batch(user, batch_id)


def status_of(job: Job) -> str:
    if job.state in Job.ACTIVE_STATES:
        return "cancelling" if job.cancel_requested else "in_progress"
    return {
        Job.DONE: "completed",
        Job.FAILED: "failed",
        Job.CANCELLED: "cancelled",
    }.get(job.state, "validating")


def _ts(when) -> int | None:
    return int(when.timestamp()) if when else None


def batch_object(job: Job) -> dict:
    """The batch as OpenAI's Batch object."""
    batch = job.batch
    states = list(job.chunks.values_list("state", flat=True))
    status = status_of(job)
    finished = job.finished_at
    return {
        "id": f"batch_{job.pk}",
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": job.model.name,
        "errors": None,
        "input_file_id": f"file-{batch.input_file_id}",
        "completion_window": batch.completion_window,
        "status": status,
        "output_file_id": f"file-{batch.output_file_id}" if batch.output_file_id else None,
        "error_file_id": f"file-{batch.error_file_id}" if batch.error_file_id else None,
        "created_at": _ts(job.created_at),
        "in_progress_at": _ts(job.queued_at),
        "expires_at": _ts(job.created_at) + 24 * 3600,
        "finalizing_at": _ts(finished) if status in ("completed", "failed") else None,
        "completed_at": _ts(finished) if status == "completed" else None,
        "failed_at": _ts(finished) if status == "failed" else None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": _ts(finished) if status == "cancelled" else None,
        "request_counts": {
            "total": len(states),
            "completed": states.count(JobChunk.DONE),
            "failed": states.count(JobChunk.FAILED),
        },
        "metadata": batch.metadata,
    }
