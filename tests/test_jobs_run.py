"""Long-context jobs end to end, with the real model and a real worker: one pass,
map-reduce, cancel, and a worker killed in the middle.

Alice owns every job here (tests/conftest.py has the cast). Passes ask for few new
tokens: the documents' prompt evaluation is what these tests exercise.
"""

from __future__ import annotations

import json
import time

import psutil
import pytest
from django.test import Client
from websockets.sync.client import connect

from inference.jobs import services
from inference.jobs.models import Job, JobChunk
from inference.models import Generation
from tests.conftest import session_cookie
from tests.jobs_documents import document, register_smollm2

INSTRUCTION = "List the places named in the document."


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def running(chunk: JobChunk) -> bool:
    chunk.refresh_from_db()
    return (
        chunk.generation is not None
        and Generation.objects.filter(pk=chunk.generation_id, state=Generation.RUNNING).exists()
    )


class JobWatcher:
    """A browser's job socket: subscribes to one job and records every frame."""

    def __init__(self, stack, user, job_id: int | None):
        self._connection = connect(
            f"ws://127.0.0.1:{stack.port}/ws/jobs/",
            additional_headers={"Origin": stack.http_url, "Cookie": session_cookie(user)},
            open_timeout=10,
        )
        self.conn = self._connection.__enter__()
        self.frames: list[dict] = []
        self.job_id = job_id
        if job_id is not None:
            self.send({"type": "job.subscribe", "job": job_id})

    def send(self, frame: dict):
        self.conn.send(json.dumps(frame))

    def until(self, predicate, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                frame = json.loads(self.conn.recv(timeout=remaining))
            except TimeoutError:
                kinds = [(f["type"], f.get("state"), f.get("passes_done")) for f in self.frames]
                raise TimeoutError(f"no matching frame in {timeout} s; saw {kinds[-30:]}") from None
            self.frames.append(frame)
            if predicate(frame):
                return frame

    def until_final(self, timeout: float) -> dict:
        return self.until(
            lambda f: (
                f["type"] in {"job.progress", "job.snapshot"}
                and f["state"] in {"done", "failed", "cancelled"}
            ),
            timeout,
        )

    def of_type(self, kind: str) -> list[dict]:
        return [f for f in self.frames if f["type"] == kind]

    def close(self):
        self._connection.__exit__(None, None, None)


@pytest.fixture
def smollm2(transactional_db):
    return register_smollm2()


@pytest.fixture
def watchers():
    opened = []
    yield opened
    for watcher in opened:
        watcher.close()


def submit(user, paragraphs: int, max_tokens: int) -> Job:
    """A counted draft, not queued yet."""
    return services.job_draft(
        user=user, instruction=INSTRUCTION, max_tokens=max_tokens, text=document(paragraphs)
    )


@pytest.mark.timeout(900)
def test_a_document_that_fits_is_answered_in_one_pass(stack, cast, smollm2, watchers):
    client = Client()
    client.force_login(cast.alice)
    client.post(
        "/jobs/new/",
        {"instruction": INSTRUCTION, "text": document(40), "model": smollm2.name, "max_tokens": 24},
    )
    job = Job.objects.get()
    # About 2,700 tokens: several prompt chunks (tests/test_batching.py reads a
    # 6,000-token one beside a chat).
    assert 2000 < job.document_tokens < 3500 and job.fits
    watcher = JobWatcher(stack, cast.alice, job.pk)
    watchers.append(watcher)
    watcher.until(lambda f: f["type"] == "job.snapshot", 10)
    assert client.post(f"/jobs/{job.pk}/run/", {"strategy": "single"}).status_code == 302

    final = watcher.until_final(600)

    job.refresh_from_db()
    assert job.state == Job.DONE and final["state"] == "done"
    chunk = job.chunks.get()
    gen = chunk.generation
    assert gen.state == Generation.DONE and gen.source == Generation.SOURCE_JOB
    assert job.result == gen.text == final["result"] and job.result.strip()
    # The whole document went in: nothing was cut off.
    assert job.document in gen.input_messages[-1]["content"]
    assert gen.metrics.prompt_tokens == job.prompt_tokens
    assert gen.metrics.completion_tokens <= 24
    # It ran on the bulk queue, and the socket showed the pass live.
    assert watcher.of_type("generation.started")
    assert watcher.of_type("generation.token")
    assert final["metrics"][0]["metrics"]["prompt_tokens"] == job.prompt_tokens
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert "Download .md" in page
    download = client.get(f"/jobs/{job.pk}/result.txt")
    assert download.content.decode() == job.result
    assert 'filename="' in download["Content-Disposition"]
    # Alice looked at it: no unread notification left.
    job.refresh_from_db()
    assert job.seen_at is not None


@pytest.mark.timeout(900)
def test_a_long_document_runs_by_map_reduce(stack, cast, transactional_db, watchers):
    # A small context makes several chunks of a document the tests can afford; the
    # steps are those of a 30,000-token document on the 8192-token default
    # (docs/jobs.md).
    register_smollm2(n_ctx=1024)
    job = submit(cast.alice, paragraphs=48, max_tokens=12)
    assert job.n_ctx == 1024 and job.document_tokens > 3 * 1024 and not job.fits
    watcher = JobWatcher(stack, cast.alice, job.pk)
    watchers.append(watcher)
    watcher.until(lambda f: f["type"] == "job.snapshot", 10)
    services.job_submit(user=cast.alice, job_id=job.pk, strategy=Job.MAP_REDUCE)

    final = watcher.until_final(800)

    job.refresh_from_db()
    assert job.state == Job.DONE, job.reason
    chunks = list(job.chunks.order_by("level", "index"))
    maps = [c for c in chunks if c.level == 0]
    assert len(maps) >= 4
    # The chunks cover the whole document, in order, with nothing left out.
    assert maps[0].start == 0 and maps[-1].end == len(job.document)
    assert all(a.end == b.start for a, b in zip(maps, maps[1:], strict=False))
    for chunk in maps:
        assert chunk.prompt_tokens + job.max_tokens <= job.n_ctx
        assert chunk.generation.metrics.prompt_tokens == chunk.prompt_tokens
    combine = chunks[-1]
    assert combine.level == 1 and combine.state == JobChunk.DONE
    assert job.result == combine.generation.text == final["result"]
    # Every chunk's answer went into the combine pass.
    combine_prompt = combine.generation.input_messages[-1]["content"]
    assert all(c.answer.strip() in combine_prompt for c in maps)
    # Progress arrived chunk by chunk.
    done_counts = [f["passes_done"] for f in watcher.of_type("job.progress")]
    assert done_counts == sorted(done_counts)
    assert set(range(1, len(chunks))) <= set(done_counts)
    assert len(final["metrics"]) == len(chunks)
    assert watcher.of_type("generation.started")


def test_a_job_can_be_cancelled_in_the_middle(stack, cast, smollm2, watchers):
    job = submit(cast.alice, paragraphs=20, max_tokens=2000)
    watcher = JobWatcher(stack, cast.alice, job.pk)
    # Alice elsewhere in the app: a page that only listens for notifications.
    elsewhere = JobWatcher(stack, cast.alice, None)
    # Charlie may not follow Alice's job.
    outsider = JobWatcher(stack, cast.charlie, job.pk)
    watchers.extend([watcher, elsewhere, outsider])
    watcher.until(lambda f: f["type"] == "job.snapshot", 10)
    assert elsewhere.until(lambda f: f["type"] == "jobs.unread", 10)["count"] == 0
    refused = outsider.until(lambda f: f["type"] == "error", 10)
    assert refused["code"] == "not_found"
    services.job_submit(user=cast.alice, job_id=job.pk, strategy=Job.SINGLE)
    wait_for(lambda: running(job.chunks.get()), 120, "the pass did not start")

    client = Client()
    client.force_login(cast.alice)
    client.post(f"/jobs/{job.pk}/cancel/")

    final = watcher.until_final(10)
    assert final["state"] == "cancelled"
    job.refresh_from_db()
    assert job.state == Job.CANCELLED and "Cancelled by alice" in job.reason
    # The worker stops the running pass: cooperative, within a batch or a token.
    gen = job.chunks.get().generation
    wait_for(lambda: Generation.objects.get(pk=gen.pk).is_final, 60, "the pass did not stop")
    gen.refresh_from_db()
    assert gen.state == Generation.CANCELLED
    assert Generation.objects.filter(source=Generation.SOURCE_JOB).count() == 1
    # The notification (toast and badge) reached Alice's other page, and only hers.
    notice = elsewhere.until(lambda f: f["type"] == "job.finished", 10)
    assert notice["state"] == "cancelled" and notice["unread"] == 1
    assert notice["url"] == f"/jobs/{job.pk}/"
    assert not [f for f in outsider.frames if f["type"] == "job.finished"]
    elsewhere.send({"type": "job.seen", "job": job.pk})
    assert elsewhere.until(lambda f: f["type"] == "jobs.unread", 10)["count"] == 0


@pytest.mark.timeout(900)
def test_a_job_resumes_from_its_finished_chunks_after_the_worker_is_killed(
    stack, cast, transactional_db, watchers, settings
):
    from inference.tasks import reap_stale_generations

    register_smollm2(n_ctx=1024)  # small chunks: this test is about the steps
    job = submit(cast.alice, paragraphs=22, max_tokens=8)
    assert job.n_ctx == 1024 and not job.fits
    watcher = JobWatcher(stack, cast.alice, job.pk)
    watchers.append(watcher)
    watcher.until(lambda f: f["type"] == "job.snapshot", 10)
    services.job_submit(user=cast.alice, job_id=job.pk, strategy=Job.MAP_REDUCE)
    assert job.chunks.count() == 2
    first, second = job.chunks.order_by("index")

    # Chunk 1 done, chunk 2 started: kill the worker (and its pool process) hard.
    watcher.until(lambda f: f["type"] == "job.progress" and f["passes_done"] == 1, 300)
    wait_for(lambda: running(second), 120, "chunk 2 did not start")
    worker = psutil.Process(stack.processes["worker"].pid)
    pool = worker.children(recursive=True)
    # The new worker loads the model as the rest of the suite knows it; the job keeps
    # the n_ctx it was planned with.
    type(job.model).objects.filter(pk=job.model_id).update(n_ctx=settings.DEFAULT_MODEL_N_CTX)
    stack.stop("worker", sig=9)
    for process in pool:
        process.kill()
    stack.start_worker()
    stack.wait_worker()

    # The reaper (beat, every 30 s) finds the pass whose worker's heartbeat expired
    # and sends it again: the new worker continues it from the text so far.
    settings.GENERATION_STALE_AFTER_S = 0
    killed = second.generation
    deadline = time.monotonic() + 90
    while not reap_stale_generations()["continued"]:
        assert time.monotonic() < deadline, "the reaper never continued the killed pass"
        time.sleep(1)
    final = watcher.until_final(600)

    job.refresh_from_db()
    assert job.state == Job.DONE and final["state"] == "done", job.reason
    first.refresh_from_db()
    second.refresh_from_db()
    # Only the killed pass ran again, and as the same generation, not a new one.
    assert first.attempts == 1 and first.generations.count() == 1
    assert second.attempts == 1 and second.generations.count() == 1
    killed.refresh_from_db()
    assert killed.pk == second.generation.pk
    assert killed.state == Generation.DONE and killed.attempts == 2
    assert job.result == job.chunks.get(level=1).answer
