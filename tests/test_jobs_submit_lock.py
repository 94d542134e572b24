"""Submitting a big job splits and counts its document outside any transaction: on
SQLite a transaction holds the database's one write lock, and every chat message
would wait behind the tokenizer. The rows are then written in one short
transaction. Alice owns the job; SmolLM2's row has a 1,024-token context, so the
document needs map-reduce. Committed data (transactional_db): inside pytest-django's
usual test transaction every call would be in an atomic block."""

import pytest
from django.db import connection
from django.test import Client

from inference.jobs import planning
from inference.jobs.models import Job
from tests.jobs_documents import document, register_smollm2


@pytest.fixture
def alice(transactional_db, django_user_model, worker_heartbeat):
    worker_heartbeat(register_smollm2(n_ctx=1024).name)  # the form offers only served models
    return django_user_model.objects.create_user("alice")


@pytest.fixture
def tokenizing(monkeypatch):
    """Whether each count of tokens the planner made ran inside a transaction."""
    seen: list[bool] = []
    for name in ("count_chat", "count_text"):
        real = getattr(planning, name)

        def counted(*args, _real=real, **kwargs):
            seen.append(connection.in_atomic_block)
            return _real(*args, **kwargs)

        monkeypatch.setattr(planning, name, counted)
    return seen


def test_a_big_submit_tokenizes_outside_any_transaction(alice, tokenizing):
    client = Client()
    client.force_login(alice)
    response = client.post(
        "/jobs/new/",
        {
            "instruction": "List the places.",
            "text": document(60),
            "model": "smollm2-135m",
            "max_tokens": 8,
        },
    )
    job = Job.objects.get()
    assert response.status_code == 302
    tokenizing.clear()

    response = client.post(f"/jobs/{job.pk}/run/", {"strategy": Job.MAP_REDUCE})
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.state == Job.QUEUED and job.chunks.filter(level=0).count() > 2
    assert len(tokenizing) > 2, "the split counted no tokens"
    assert not any(tokenizing), "the document was tokenized inside a transaction"


def test_a_draft_submitted_twice_is_queued_once(alice):
    from inference.jobs import services

    job = services.job_draft(
        user=alice, instruction="List the places.", max_tokens=8, text=document(22)
    )
    services.job_submit(user=alice, job_id=job.pk, strategy=Job.MAP_REDUCE)
    with pytest.raises(services.JobError) as caught:
        services.job_submit(user=alice, job_id=job.pk, strategy=Job.MAP_REDUCE)
    assert caught.value.code == "state"
    assert job.chunks.filter(level=0).count() == 2
