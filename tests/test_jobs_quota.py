"""Every pass of a job counts against the owner's quotas, not only the first: a
pass over the limit waits, saying why, and starts by itself once the limit allows.
Checked on the database alone (the worker's part is written as the worker writes
it). Alice owns the job; SmolLM2's row has a 1,024-token context, so a short
document needs map-reduce."""

from datetime import timedelta

import pytest
from django.utils import timezone

from inference.jobs import services
from inference.jobs.models import Job, JobChunk
from inference.jobs.selectors import job_snapshot
from inference.models import Generation
from mixtralweb.accounts.models import Quota
from tests.jobs_documents import document, register_smollm2


@pytest.fixture
def alice(db, django_user_model):
    register_smollm2(n_ctx=1024)
    return django_user_model.objects.create_user("alice")


def map_reduce_job(user) -> Job:
    job = services.job_draft(
        user=user, instruction="List the places.", max_tokens=8, text=document(22)
    )
    return services.job_submit(user=user, job_id=job.pk, strategy=Job.MAP_REDUCE)


def end_pass(chunk: JobChunk, text: str, prompt_tokens: int = 0, completion_tokens: int = 0):
    """What the worker does when a pass ends: its text and what it cost."""
    gen = JobChunk.objects.get(pk=chunk.pk).generation
    gen.state, gen.text, gen.finished_at = Generation.DONE, text, timezone.now()
    gen.prompt_tokens, gen.completion_tokens = prompt_tokens, completion_tokens
    gen.save()
    return gen


def test_a_pass_over_the_per_minute_limit_waits_and_then_starts_by_itself(alice):
    Quota.objects.create(user=alice, requests_per_minute=1)
    job = map_reduce_job(alice)
    first = end_pass(job.chunks.get(index=0), "Harbour.")
    services.job_advance(job_id=job.pk)
    job.refresh_from_db()
    assert job.state == Job.RUNNING
    assert "Waiting for the quota" in job.reason and "1 generation(s) per minute" in job.reason
    assert job_snapshot(job)["reason"] == job.reason
    assert job.chunks.get(index=1).generation is None
    assert Generation.objects.count() == 1

    Generation.objects.filter(pk=first.pk).update(queued_at=timezone.now() - timedelta(minutes=2))
    services.jobs_redrive()  # the beat task, a minute later
    job.refresh_from_db()
    assert job.reason == ""
    assert job.chunks.get(index=1).generation is not None


def test_the_tokens_of_each_pass_count_against_the_daily_quota(alice):
    Quota.objects.create(user=alice, tokens_per_day=1000)
    job = map_reduce_job(alice)
    end_pass(job.chunks.get(index=0), "Harbour.", prompt_tokens=900, completion_tokens=100)
    services.job_advance(job_id=job.pk)
    job.refresh_from_db()
    assert "1,000 tokens per day" in job.reason and "1,000 have been used today" in job.reason
    assert job.chunks.get(index=1).generation is None


def test_a_pass_within_the_quota_starts_at_once(alice):
    Quota.objects.create(user=alice, tokens_per_day=1000, requests_per_minute=5)
    job = map_reduce_job(alice)
    end_pass(job.chunks.get(index=0), "Harbour.", prompt_tokens=300, completion_tokens=8)
    services.job_advance(job_id=job.pk)
    job.refresh_from_db()
    assert job.reason == ""
    assert job.chunks.get(index=1).generation is not None
