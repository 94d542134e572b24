"""How a job moves from pass to pass, checked on the database alone (no worker):
the worker's part, a pass ending, is written here as the worker writes it.

Alice owns the jobs; the model row is SmolLM2's with a 1,024-token context, so a
short document needs map-reduce."""

import pytest
from django.utils import timezone

from inference.jobs import services
from inference.jobs.models import Job, JobChunk
from inference.jobs.selectors import job_snapshot
from inference.models import Generation
from tests.jobs_documents import document, register_smollm2


@pytest.fixture
def alice(db, django_user_model):
    register_smollm2(n_ctx=1024)
    return django_user_model.objects.create_user("alice")


def map_reduce_job(user, paragraphs=22) -> Job:
    job = services.job_draft(
        user=user, instruction="List the places.", max_tokens=8, text=document(paragraphs)
    )
    return services.job_submit(user=user, job_id=job.pk, strategy=Job.MAP_REDUCE)


def end_pass(chunk: JobChunk, state: str, text: str = "", reason: str = "") -> Generation:
    """What the worker does when a pass ends."""
    gen = JobChunk.objects.get(pk=chunk.pk).generation
    gen.state, gen.text, gen.reason, gen.finished_at = state, text, reason, timezone.now()
    gen.save()
    return gen


def test_a_queued_job_shows_its_place_in_the_queue(alice):
    job = map_reduce_job(alice)
    snapshot = job_snapshot(job)
    assert snapshot["phase"] == "queued" and snapshot["position"] == 1
    assert [p["state"] for p in snapshot["passes"]] == ["running", "pending", "planned"]
    assert snapshot["current"]["label"] == "Chunk 1"
    gen = job.chunks.get(index=0).generation
    assert gen.source == Generation.SOURCE_JOB and gen.params["max_tokens"] == 8
    assert "part 1 of 2" in gen.input_messages[0]["content"]


def test_advancing_twice_for_the_same_pass_takes_one_step(alice):
    job = map_reduce_job(alice)
    first = job.chunks.get(index=0)
    end_pass(first, Generation.DONE, "Harbour, museum.")
    services.job_advance(job_id=job.pk)
    services.job_advance(job_id=job.pk)  # a redelivered signal
    first.refresh_from_db()
    assert first.state == JobChunk.DONE and first.answer == "Harbour, museum."
    assert Generation.objects.count() == 2
    job.refresh_from_db()
    assert job.state == Job.RUNNING


def test_the_combine_pass_gets_every_answer_and_its_answer_is_the_result(alice):
    job = map_reduce_job(alice)
    end_pass(job.chunks.get(index=0), Generation.DONE, "Harbour.")
    services.job_advance(job_id=job.pk)
    end_pass(job.chunks.get(index=1), Generation.DONE, "Museum.")
    services.job_advance(job_id=job.pk)
    combine = job.chunks.get(level=1)
    prompt = combine.generation.input_messages[0]["content"]
    assert "Harbour." in prompt and "Museum." in prompt and "Combine" in prompt
    end_pass(combine, Generation.DONE, "Harbour and museum.")
    services.job_advance(job_id=job.pk)
    job.refresh_from_db()
    assert job.state == Job.DONE and job.result == "Harbour and museum."
    assert job.seen_at is None  # an unread notification until Alice opens it


def test_a_pass_that_keeps_failing_fails_the_job_with_its_reason(alice):
    job = map_reduce_job(alice)
    for _ in range(services.PASS_MAX_ATTEMPTS):
        end_pass(job.chunks.get(index=0), Generation.FAILED, reason="Out of memory.")
        services.job_advance(job_id=job.pk)
    job.refresh_from_db()
    assert job.state == Job.FAILED
    assert job.reason == "Chunk 1 failed 3 times; the last time: Out of memory."
    assert job.chunks.get(index=0).generations.count() == 3


def test_the_redrive_moves_a_job_whose_signal_was_missed(alice):
    job = map_reduce_job(alice)
    end_pass(job.chunks.get(index=0), Generation.DONE, "Harbour.")  # no signal
    assert services.jobs_redrive() == 1
    assert job.chunks.get(index=1).generation is not None


def test_cancelling_a_queued_job_cancels_its_pass_before_it_starts(alice):
    job = map_reduce_job(alice)
    services.job_cancel(user=alice, job_id=job.pk)
    job.refresh_from_db()
    assert job.state == Job.CANCELLED and job.reason == "Cancelled by alice."
    gen = job.chunks.get(index=0).generation
    assert gen.state == Generation.CANCELLED and gen.cancel_requested
    # The worker ends nothing more; advancing a cancelled job does nothing.
    services.job_advance(job_id=job.pk)
    assert Generation.objects.count() == 1


def test_map_reduce_needs_room_for_two_answers_in_a_combine(alice):
    job = services.job_draft(
        user=alice, instruction="List the places.", max_tokens=400, text=document(22)
    )
    with pytest.raises(services.JobError, match="Lower the maximum new tokens"):
        services.job_submit(user=alice, job_id=job.pk, strategy=Job.MAP_REDUCE)
    job.refresh_from_db()
    assert job.state == Job.DRAFT and Generation.objects.count() == 0
