"""The Files and Batches APIs (inference/jobs/batches.py), through the official
`openai` client against the live stack. Alice calls them with her key "script"."""

from __future__ import annotations

import json
import time

import openai
import pytest
from django.conf import settings
from django.test import Client

from inference.jobs import services as job_services
from inference.jobs.models import Job, JobChunk
from inference.models import Generation, LanguageModel
from mixtralweb.accounts.models import ApiKey

MODEL = settings.DEFAULT_MODEL_NAME
ENDPOINT = "/v1/chat/completions"


@pytest.fixture
def alice_key(cast, default_model):
    key, secret = ApiKey.issue(user=cast.alice, name="script")
    key.secret = secret
    return key


def client_for(stack, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key=secret, max_retries=0, timeout=60)


@pytest.fixture
def client(stack, alice_key) -> openai.OpenAI:
    return client_for(stack, alice_key.secret)


def line(custom_id: str, body: dict | None = None, **envelope) -> dict:
    body = body or {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Say {custom_id}."}],
        "max_tokens": 2,
        "temperature": 0,
    }
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body, **envelope}


def jsonl(*lines) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in lines).encode()


def upload(client, *lines, name: str = "batch.jsonl"):
    return client.files.create(file=(name, jsonl(*lines), "application/jsonl"), purpose="batch")


def start(client, *lines):
    file = upload(client, *lines)
    return client.batches.create(input_file_id=file.id, endpoint=ENDPOINT, completion_window="24h")


def wait_for(client, batch_id: str, statuses: set, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)


def read_jsonl(client, file_id: str) -> list[dict]:
    return [json.loads(row) for row in client.files.content(file_id).text.splitlines()]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}},
    },
}


def test_a_batch_with_an_invalid_line_answers_the_others_and_reports_it(client, cast):
    invalid = line("bad", {"model": MODEL, "messages": []})
    # A line with tools is answered with its call, as the endpoint answers.
    call = line(
        "call",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Weather in Rome?"}],
            "tools": [WEATHER],
            "tool_choice": "required",
            "max_tokens": 48,
            "temperature": 0,
        },
    )
    batch = start(client, line("one"), invalid, line("two"), call)
    assert batch.status == "in_progress" and batch.request_counts.total == 4
    # The invalid line is refused at once, with the endpoint's own words.
    assert batch.request_counts.failed == 1

    done = wait_for(client, batch.id, {"completed", "failed"})
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)

    outputs = read_jsonl(client, done.output_file_id)
    assert [row["custom_id"] for row in outputs] == ["one", "two", "call"]
    gens = Generation.objects.filter(source=Generation.SOURCE_BATCH).order_by("queued_at")
    assert len(gens) == 3, "one generation per valid line, none for the invalid one"
    called = outputs.pop()["response"]["body"]["choices"][0]
    assert called["finish_reason"] == "tool_calls" and called["message"]["content"] is None
    [tool_call] = called["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]).get("city", "Rome") in ("Paris", "Rome")
    for row, gen in zip(outputs, gens[:2], strict=True):
        body = row["response"]["body"]
        assert row["error"] is None and row["response"]["status_code"] == 200
        assert body["object"] == "chat.completion" and body["id"] == f"chatcmpl-{gen.pk}"
        assert body["choices"][0]["message"]["content"] == gen.text
        assert body["usage"]["completion_tokens"] == gen.completion_tokens <= 2
        # A generation like any other: the key's, at job priority, with metrics.
        assert gen.state == Generation.DONE and gen.api_key_name == "script"
        assert gen.user == cast.alice and gen.params["max_tokens"] == 2
        assert gen.metrics.prompt_tokens > 0

    errors = read_jsonl(client, done.error_file_id)
    assert len(errors) == 1 and errors[0]["custom_id"] == "bad"
    assert errors[0]["response"] is None
    assert errors[0]["error"]["message"] == "messages must be a non-empty array."

    # The batch is a job: on Alice's jobs page with its progress.
    job = Job.objects.get(pk=int(done.id.removeprefix("batch_")))
    assert job.strategy == Job.BATCH and job.state == Job.DONE
    browser = Client()
    browser.force_login(cast.alice)
    page = browser.get("/jobs/").content.decode()
    assert "API batch: batch.jsonl" in page
    assert "3 of 4 requests answered, 1 failed" in page
    assert browser.get(f"/jobs/{job.pk}/").status_code == 200


def test_cancelling_a_batch_stops_its_queued_lines_and_keeps_what_was_answered(client):
    # Long enough answers that the cancel finds the first line in flight.
    story = {"role": "user", "content": "Write a long story about the sea."}
    body = {"model": MODEL, "messages": [story], "max_tokens": 64, "temperature": 0}
    batch = start(client, *[line(f"n{i}", body) for i in range(3)])
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in {"cancelling", "cancelled"}

    cancelled = wait_for(client, batch.id, {"cancelled"})
    job = Job.objects.get(pk=int(batch.id.removeprefix("batch_")))
    assert job.state == Job.CANCELLED and job.cancel_requested
    assert not Generation.objects.filter(state__in=[Generation.QUEUED, Generation.RUNNING]).exists()
    # Lines are started one at a time (job_sequences 1): the last never started.
    assert Generation.objects.filter(source=Generation.SOURCE_BATCH).count() < 3
    errors = read_jsonl(client, cancelled.error_file_id)
    answered = read_jsonl(client, cancelled.output_file_id) if cancelled.output_file_id else []
    assert {row["custom_id"] for row in errors + answered} == {"n0", "n1", "n2"}
    assert errors[-1]["custom_id"] == "n2"
    assert errors[-1]["error"]["code"] == "batch_cancelled"
    assert cancelled.request_counts.completed == len(answered)


def test_a_line_whose_worker_died_is_run_again_by_the_redrive(
    client, default_model, worker_heartbeat
):
    """Resumption through the redrive path itself, without killing a worker: the
    line's generation ends failed (what the reaper does when its worker died) without
    moving the batch on; jobs_redrive starts it again, up to the job's attempts, then
    it is an error line and the batch ends. The model has no real worker here, so
    nothing runs."""
    LanguageModel.objects.create(name="idle", path=default_model.path, n_ctx=default_model.n_ctx)
    worker_heartbeat("idle")
    body = {"model": "idle", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    too_long = {**body, "max_tokens": default_model.n_ctx}
    batch = start(client, line("a", body), line("long", too_long))
    job = Job.objects.get(pk=int(batch.id.removeprefix("batch_")))
    chunk = job.chunks.get(index=0)
    first = chunk.generation
    assert first.source == Generation.SOURCE_BATCH and first.state == Generation.QUEUED
    assert first.input_messages == body["messages"]

    for attempt in range(2, job_services.PASS_MAX_ATTEMPTS + 1):
        Generation.objects.filter(pk=chunk.generation_id).update(
            state=Generation.FAILED, reason="The worker stopped."
        )
        job_services.jobs_redrive()
        chunk.refresh_from_db()
        assert chunk.attempts == attempt and chunk.generation.state == Generation.QUEUED
        assert chunk.generation.input_messages == body["messages"]
        assert client.batches.retrieve(batch.id).status == "in_progress"

    Generation.objects.filter(pk=chunk.generation_id).update(
        state=Generation.FAILED, reason="The worker stopped."
    )
    job_services.jobs_redrive()
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id is None
    errors = {row["custom_id"]: row["error"] for row in read_jsonl(client, done.error_file_id)}
    assert errors["a"]["code"] == "generation_failed"
    assert "The worker stopped." in errors["a"]["message"]
    # Counted against the context before it was queued, as the endpoint counts.
    assert errors["long"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {default_model.n_ctx} tokens" in errors["long"]["message"]
    assert JobChunk.objects.get(job=job, index=1).generation is None


# --- refusals: nothing is queued -------------------------------------------------------


def test_bad_files_are_refused_with_400_naming_the_problem(client):
    cases = [
        ({"purpose": "fine-tune"}, jsonl(line("a")), "purpose"),
        ({}, b'{"custom_id": "a"}\nnot json\n', "Line 2 is not a JSON object"),
        ({}, b"", "no lines"),
        ({}, b"\xff\xfe", "not UTF-8"),
        ({}, b"[1]\n" * (settings.BATCH_MAX_LINES + 1), "at most"),
        ({}, b" " * (settings.BATCH_FILE_MAX_BYTES + 1), "the limit is"),
    ]
    for options, data, words in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.files.create(
                file=("in.jsonl", data, "application/jsonl"),
                purpose=options.get("purpose", "batch"),
            )
        assert words in caught.value.body["message"], caught.value.body
    assert not Job.objects.exists()


def test_bad_batch_requests_are_refused_with_400_or_404(client, stack, cast):
    file = upload(client, line("a"))
    cases = [
        ({"completion_window": "48h"}, 400, "completion_window"),
        ({"endpoint": "/v1/completions"}, 400, "endpoint"),
        ({"input_file_id": "file-999999"}, 404, None),
        ({"input_file_id": "nonsense"}, 404, None),
    ]
    for change, status, param in cases:
        request = {"input_file_id": file.id, "endpoint": ENDPOINT, "completion_window": "24h"}
        with pytest.raises(openai.APIStatusError) as caught:
            client.batches.create(**(request | change))
        assert caught.value.status_code == status
        assert caught.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_999999")
    assert not Job.objects.exists() and not Generation.objects.exists()


def test_files_and_batches_are_private_to_their_keys_user(client, stack, cast):
    batch = start(client, line("a", {"model": MODEL, "messages": []}))  # runs nothing
    _, bob_secret = ApiKey.issue(user=cast.bob, name="bob")
    bob = client_for(stack, bob_secret)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(batch.input_file_id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.create(
            input_file_id=batch.input_file_id, endpoint=ENDPOINT, completion_window="24h"
        )
    # Alice's other key reads them: files belong to the user, not to one key.
    _, other_secret = ApiKey.issue(user=cast.alice, name="other")
    mine = client_for(stack, other_secret).batches.retrieve(batch.id)
    assert mine.status == "failed" and mine.request_counts.failed == 1
