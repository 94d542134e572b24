"""The lines of an API batch: each read and checked as POST /v1/chat/completions
would check it, and, when the batch ends, its output and error files in OpenAI's
JSONL shapes. No writes to jobs here but the files: services.py moves batches on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from django.core.files.base import ContentFile

from inference import services as inference_services
from inference.models import Generation
from inference.openai_api import parsing
from inference.openai_api.errors import ApiError, model_error
from inference.openai_api.views import CHAT, _check_context, _count_prompt_tokens, _whole_answer
from inference.selectors import final_event

from .models import Batch, BatchFile, Job, JobChunk

ENDPOINT = "/v1/chat/completions"


@dataclass
class Line:
    """One line of an input file, as its text's offsets and what reading it gave."""

    start: int
    end: int
    custom_id: str | None = None
    parsed: parsing.ApiRequest | None = None
    model: object = None
    prompt_tokens: int = 0
    error: dict | None = None  # {"code", "message"}: refused


def split_lines(text: str) -> list[tuple[int, int]]:
    """(start, end) of each non-blank line."""
    spans, start = [], 0
    for raw in text.splitlines(keepends=True):
        end = start + len(raw.rstrip("\r\n"))
        if text[start:end].strip():
            spans.append((start, end))
        start += len(raw)
    return spans


def error(code: str | None, message: str) -> dict:
    return {"code": code or "invalid_request", "message": message}


def _api_error(exc: ApiError) -> dict:
    return error(exc.code or (f"invalid_{exc.param}" if exc.param else None), exc.message)


def read_request(body) -> parsing.ApiRequest:
    """A line's body, as the endpoint reads it (ApiError: refused, with its words)."""
    if not isinstance(body, dict):
        raise parsing.bad_request("body must be a JSON object: the request's body.", "body")
    parsed = parsing.parse_chat(body)
    if parsed.stream:
        raise parsing.bad_request("stream is not supported in a batch.", "stream")
    return parsed


def read_line(text: str, start: int, end: int, seen_ids: set, models: dict) -> Line:
    """Check one line: its envelope (custom_id, method, url), then its body as the
    endpoint would, its model, and its prompt's tokens against the model's context."""
    line = Line(start, end)
    try:
        envelope = json.loads(text[start:end])
    except ValueError:
        line.error = error("invalid_json", "The line is not valid JSON.")
        return line
    if not isinstance(envelope, dict):
        line.error = error("invalid_json", "The line must be a JSON object.")
        return line
    custom_id = envelope.get("custom_id")
    if isinstance(custom_id, str) and custom_id:
        line.custom_id = custom_id
    try:
        if line.custom_id is None:
            raise parsing.bad_request("custom_id must be a non-empty string.", "custom_id")
        if custom_id in seen_ids:
            raise ApiError(
                400,
                f"custom_id {custom_id!r} is used by an earlier line.",
                code="duplicate_custom_id",
            )
        seen_ids.add(custom_id)
        if envelope.get("method") != "POST":
            raise parsing.bad_request('method must be "POST".', "method")
        if envelope.get("url") != ENDPOINT:
            raise parsing.bad_request(f"url must be {ENDPOINT!r}, the batch's endpoint.", "url")
        line.parsed = read_request(envelope.get("body"))
        line.model = _model(line.parsed.model, models)
        tokens = _count_prompt_tokens(line.model, line.parsed)
        if tokens is not None:
            # The endpoint's refusal, word for word; a default max_tokens is shortened.
            _check_context(line.model, tokens, line.parsed.params, line.parsed)
        line.prompt_tokens = tokens or 0
    except ApiError as exc:
        line.error = _api_error(exc)
    return line


def _model(name: str, models: dict):
    """The model as the endpoint finds it (the same refusals), once per name."""
    if name not in models:
        try:
            models[name] = inference_services.get_model(name)
        except inference_services.ChatError as exc:
            models[name] = model_error(exc)
    found = models[name]
    if isinstance(found, ApiError):
        raise found
    return found


def line_request(job: Job, chunk: JobChunk) -> tuple[list[dict], dict]:
    """What the chunk's line asks the model: its messages and sampling params, read
    again from the input file (the same reading that accepted it)."""
    envelope = json.loads(job.document[chunk.start : chunk.end])
    parsed = read_request(envelope.get("body"))
    params = dict(parsed.params)
    if chunk.prompt_tokens:
        # As _check_context left it when the batch was counted.
        params["max_tokens"] = min(params["max_tokens"], job.n_ctx - chunk.prompt_tokens)
    return parsed.messages, params


def custom_id_of(job: Job, chunk: JobChunk) -> str | None:
    try:
        envelope = json.loads(job.document[chunk.start : chunk.end])
    except ValueError:
        return None
    custom_id = envelope.get("custom_id") if isinstance(envelope, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def _output_line(job: Job, chunk: JobChunk, gen: Generation) -> dict:
    body = _whole_answer(gen, CHAT, gen.text, final_event(gen), chunk.prompt_tokens or None)
    return {
        "id": f"batch_req_{gen.pk}",
        "custom_id": custom_id_of(job, chunk),
        "response": {"status_code": 200, "request_id": f"req_{gen.pk}", "body": body},
        "error": None,
    }


def _error_line(job: Job, chunk: JobChunk, err: dict) -> dict:
    return {
        "id": f"batch_req_{job.pk}_{chunk.index}",
        "custom_id": custom_id_of(job, chunk),
        "response": None,
        "error": err,
    }


def chunk_error(chunk: JobChunk, cancelled: bool) -> dict:
    """Why a line has no answer."""
    if chunk.state == JobChunk.FAILED:
        try:
            return json.loads(chunk.answer)
        except ValueError:
            return error("failed", chunk.answer or "The request failed.")
    if cancelled:
        return error("batch_cancelled", "The batch was cancelled before this request ran.")
    return error("not_run", "The request did not run.")


def store(user, name: str, purpose: str, data: bytes) -> BatchFile:
    """A file row with its content in Django's default storage."""
    file = BatchFile(user=user, purpose=purpose, filename=name, bytes=len(data))
    file.content.save(name, ContentFile(data), save=False)
    file.save()
    return file


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def write_files(job: Job, batch: Batch) -> tuple[int, int]:
    """The output file (answered lines) and the error file (every other line), each
    only if it has a line, in the input's order. Returns their line counts."""
    chunks = job.chunks.select_related("generation__metrics", "generation__model")
    outputs, errors = [], []
    cancelled = job.cancel_requested
    for chunk in chunks.order_by("index"):
        gen = chunk.generation
        if chunk.state == JobChunk.DONE and gen is not None:
            outputs.append(_output_line(job, chunk, gen))
        else:
            errors.append(_error_line(job, chunk, chunk_error(chunk, cancelled)))
    stem = f"batch_{job.pk}"
    if outputs:
        batch.output_file = store(
            job.user, f"{stem}_output.jsonl", BatchFile.BATCH_OUTPUT, _jsonl(outputs)
        )
    if errors:
        batch.error_file = store(
            job.user, f"{stem}_error.jsonl", BatchFile.BATCH_OUTPUT, _jsonl(errors)
        )
    batch.save(update_fields=["output_file", "error_file"])
    return len(outputs), len(errors)
