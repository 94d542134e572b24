"""Submitting a job: the document is read and counted before anything is queued,
and each bad input gets a clear message on the form with nothing queued and the
typed fields kept.

The cast, as in tests/conftest.py but without password hashing, in a rolled-back
transaction (these tests need no worker): Alice owns the jobs; Bob is her
team-mate in Red; Charlie sees nothing of theirs."""

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from inference.jobs.models import Job
from inference.models import Generation, LanguageModel
from mixtralweb.accounts.models import Membership, Team
from tests.jobs_documents import (
    document,
    pdf_bomb,
    pdf_with_text,
    pdf_without_text,
    register_smollm2,
)

INSTRUCTION = "Summarize the document in three bullet points."


@pytest.fixture
def cast(db, django_user_model, worker_heartbeat):
    worker_heartbeat(register_smollm2().name)  # the form offers only served models
    alice = django_user_model.objects.create_user("alice")
    bob = django_user_model.objects.create_user("bob")
    charlie = django_user_model.objects.create_user("charlie")
    red = Team.objects.create(name="Red")
    Membership.objects.create(team=red, user=alice, role=Membership.ADMIN)
    Membership.objects.create(team=red, user=bob)
    return type("Cast", (), {"alice": alice, "bob": bob, "charlie": charlie, "red": red})


@pytest.fixture
def alice(cast):
    client = Client()
    client.force_login(cast.alice)
    return client


def post_job(
    client, *, upload=None, text="", max_tokens=64, instruction=INSTRUCTION, model="smollm2-135m"
):
    data = {
        "instruction": instruction,
        "text": text,
        "model": model,
        "max_tokens": max_tokens,
    }
    if upload is not None:
        data["file"] = upload
    return client.post("/jobs/new/", data)


def assert_refused(response, message: str):
    assert response.status_code == 400
    page = response.content.decode()
    assert message in page, page[:3000]
    assert INSTRUCTION in page, "the instruction typed was lost"
    assert Job.objects.count() == 0
    assert Generation.objects.count() == 0


def test_it_refuses_an_empty_file(alice):
    response = post_job(alice, upload=SimpleUploadedFile("notes.txt", b""))
    assert_refused(response, "notes.txt is empty.")


def test_it_refuses_a_file_of_only_blank_lines(alice):
    response = post_job(alice, upload=SimpleUploadedFile("notes.md", b"\n  \n\t\n"))
    assert_refused(response, "notes.md has no text in it.")


def test_it_refuses_an_unsupported_type(alice):
    upload = SimpleUploadedFile("report.docx", b"PK\x03\x04 not a text file")
    assert_refused(post_job(alice, upload=upload), ".docx is not supported")


def test_it_refuses_a_binary_file_named_txt(alice):
    upload = SimpleUploadedFile("image.txt", b"\x00\x01\x02binary\x00")
    assert_refused(post_job(alice, upload=upload), "looks like a binary file")


def test_it_refuses_a_pdf_without_a_text_layer(alice):
    upload = SimpleUploadedFile("scan.pdf", pdf_without_text())
    assert_refused(post_job(alice, upload=upload), "scan.pdf has no text layer")


def test_it_refuses_a_file_that_is_not_really_a_pdf(alice):
    upload = SimpleUploadedFile("fake.pdf", b"just some words")
    assert_refused(post_job(alice, upload=upload), "fake.pdf is not a PDF file.")


def test_it_refuses_a_damaged_pdf(alice):
    upload = SimpleUploadedFile("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog")
    response = post_job(alice, upload=upload)
    assert response.status_code == 400
    assert Job.objects.count() == 0


def test_it_refuses_invalid_utf8(alice):
    data = "Première ligne\nsecond line\n".encode("latin-1")
    upload = SimpleUploadedFile("latin1.txt", data)
    assert_refused(post_job(alice, upload=upload), "latin1.txt is not valid UTF-8 (byte 6, line 1)")


def test_it_refuses_a_file_over_the_size_limit(alice, settings):
    settings.JOB_UPLOAD_MAX_BYTES = 10_000
    upload = SimpleUploadedFile("big.txt", b"word " * 2_001)
    assert_refused(
        post_job(alice, upload=upload), "big.txt is 10,005 bytes; the limit is 10,000 bytes."
    )


def test_it_refuses_pasted_text_over_the_size_limit(alice, settings):
    settings.JOB_UPLOAD_MAX_BYTES = 10_000
    assert_refused(post_job(alice, text="word " * 2_001), "The pasted text is 10,005 bytes")


def test_it_refuses_a_pdf_decompression_bomb(alice, settings):
    settings.JOB_UPLOAD_MAX_BYTES = 200_000  # PDF streams may expand to 800 KB
    bomb = pdf_bomb(5_000_000)
    assert len(bomb) < 20_000
    upload = SimpleUploadedFile("bomb.pdf", bomb)
    assert_refused(
        post_job(alice, upload=upload), "bomb.pdf expands to more than 0.8 MB when decompressed"
    )


def test_it_refuses_an_empty_instruction(alice):
    response = post_job(alice, text="Some text.", instruction="   ")
    assert response.status_code == 400
    assert Job.objects.count() == 0


def test_it_refuses_both_a_file_and_pasted_text(alice):
    upload = SimpleUploadedFile("a.txt", b"file text")
    assert_refused(post_job(alice, upload=upload, text="pasted"), "not both")


def test_it_counts_the_tokens_before_anything_is_queued(alice):
    response = post_job(alice, text=document(20), max_tokens=64)
    assert response.status_code == 302
    job = Job.objects.get()
    assert job.state == Job.DRAFT
    assert 1000 < job.document_tokens < job.prompt_tokens < 2000
    assert job.n_ctx == 8192 and job.fits
    assert Generation.objects.count() == 0
    page = alice.get(response["Location"]).content.decode()
    assert f"{job.document_tokens:,}" in page and "8,192" in page
    assert "It fits" in page and "Queue the job" in page


def test_it_reads_the_text_of_a_pdf(alice):
    upload = SimpleUploadedFile(
        "minutes.pdf", pdf_with_text(["The harbour opens in May.", "Ships pay a fee."])
    )
    response = post_job(alice, upload=upload)
    assert response.status_code == 302
    job = Job.objects.get()
    assert "The harbour opens in May." in job.document and "Ships pay a fee." in job.document
    assert job.document_name == "minutes.pdf" and job.title == "minutes.pdf"


def test_a_document_too_long_for_the_context_offers_map_reduce_or_refuse(alice):
    response = post_job(alice, text=document(150), max_tokens=64)
    job = Job.objects.get()
    assert job.prompt_tokens > 8192 and not job.fits
    page = alice.get(response["Location"]).content.decode()
    assert "It does not fit." in page and "Map-reduce" in page and "Refuse" in page
    assert "split into about 2 chunks" in page
    # One pass is not allowed: it would cut the document off.
    alice.post(f"/jobs/{job.pk}/run/", {"strategy": "single"})
    job.refresh_from_db()
    assert job.state == Job.DRAFT and Generation.objects.count() == 0
    # Refusing discards it, and nothing was ever queued.
    response = alice.post(f"/jobs/{job.pk}/discard/")
    assert response.status_code == 302
    assert Job.objects.count() == 0 and Generation.objects.count() == 0


def test_a_team_mate_sees_a_shared_job_and_an_outsider_does_not(cast):
    from inference.jobs.services import job_draft

    job = job_draft(
        user=cast.alice, instruction="Sum up.", max_tokens=32, text="Hello.", team=cast.red
    )
    bob, charlie = Client(), Client()
    bob.force_login(cast.bob)
    charlie.force_login(cast.charlie)
    assert bob.get(f"/jobs/{job.pk}/").status_code == 200
    assert charlie.get(f"/jobs/{job.pk}/").status_code == 404
    assert str(job) not in charlie.get("/jobs/").content.decode()
    # Only the owner may run it.
    bob.post(f"/jobs/{job.pk}/run/", {"strategy": "single"})
    job.refresh_from_db()
    assert job.state == Job.DRAFT


def test_the_jobs_list_filters_by_state(alice, cast):
    from inference.jobs.services import job_draft

    job_draft(user=cast.alice, instruction="First.", max_tokens=32, text="Hello.", title="Alpha")
    Job.objects.update(state=Job.FAILED, reason="test")
    job_draft(user=cast.alice, instruction="Second.", max_tokens=32, text="Hello.", title="Beta")
    page = alice.get("/jobs/?state=failed").content.decode()
    assert "Alpha" in page and "Beta" not in page
    page = alice.get("/jobs/?q=bet").content.decode()
    assert "Beta" in page and "Alpha" not in page


def test_a_draft_says_when_map_reduce_cannot_work(alice):
    response = post_job(alice, text=document(150), max_tokens=4000)
    page = alice.get(response["Location"]).content.decode()
    assert "Map-reduce is not possible" in page and "Lower the maximum new tokens" in page
    assert 'value="map_reduce"' not in page and "Refuse" in page


def test_the_form_offers_only_models_a_live_worker_serves(alice, cast):
    smollm2 = LanguageModel.objects.get(name="smollm2-135m")
    LanguageModel.objects.create(name="no-worker", path=smollm2.path, n_ctx=4096)
    offered = [name for name, _ in alice.get("/jobs/new/").context["form"].fields["model"].choices]
    assert offered == ["smollm2-135m"]
    assert_refused(
        post_job(alice, text="Hello.", model="no-worker"),
        "No worker is serving the model no-worker right now",
    )


ELSEWHERE = "/srv/models/elsewhere.gguf"


def test_a_model_file_this_server_cannot_read_is_refused_without_its_path(
    alice, cast, worker_heartbeat
):
    # A worker on another machine serves it; its file is not on this one.
    LanguageModel.objects.create(name="elsewhere", path=ELSEWHERE)
    worker_heartbeat("elsewhere")
    response = post_job(alice, text="Hello.", model="elsewhere")
    assert_refused(response, "elsewhere cannot count this document: its file cannot be read")
    assert ELSEWHERE not in response.content.decode()
    # Staff see why, path and all.
    staff = Client()
    staff.force_login(get_user_model().objects.create_user("stella", is_staff=True))
    assert_refused(post_job(staff, text="Hello.", model="elsewhere"), ELSEWHERE)
