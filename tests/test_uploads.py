"""Hard caps on what a client may send: request bodies (counted as they arrive,
large only on the job form), uploaded files (not kept past the limit while they
are read) and PDFs (a page limit and a time budget for reading their text). Each
refusal on the job form says why and keeps what the user typed.

Alice submits the jobs; nothing is queued (no worker needed)."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client, RequestFactory

from inference.jobs.models import Job
from inference.jobs.uploads import DocumentUploadHandler
from tests.jobs_documents import pdf_of_pages, register_smollm2

INSTRUCTION = "Summarize the document in three bullet points."


@pytest.fixture
def alice(db, django_user_model, worker_heartbeat):
    worker_heartbeat(register_smollm2().name)  # the form offers only served models
    client = Client()
    client.force_login(django_user_model.objects.create_user("alice"))
    return client


def post_job(client, upload):
    # The file comes before the fields after it in the body, as a browser sends them.
    data = {"instruction": INSTRUCTION, "text": "", "file": upload}
    data.update({"model": "smollm2-135m", "max_tokens": 321})
    return client.post("/jobs/new/", data)


def assert_refused_keeping_the_form(response, message: str):
    assert response.status_code == 400
    page = response.content.decode()
    assert message in page, page[:3000]
    assert INSTRUCTION in page, "the instruction typed was lost"
    assert 'value="321"' in page, "the maximum new tokens typed were lost"
    assert Job.objects.count() == 0


# --- uploaded files ----------------------------------------------------------------
def test_a_file_over_the_limit_is_refused_with_its_size_and_the_form_is_kept(alice, settings):
    settings.JOB_UPLOAD_MAX_BYTES = 10_000
    upload = SimpleUploadedFile("big.txt", b"word " * 30_000)
    assert_refused_keeping_the_form(
        post_job(alice, upload), "big.txt is 0.1 MB; the limit is 10,000 bytes."
    )


def test_a_file_is_not_kept_past_the_limit_while_it_is_read(settings):
    settings.JOB_UPLOAD_MAX_BYTES = 10_000
    request = RequestFactory().post(
        "/jobs/new/",
        {"file": SimpleUploadedFile("big.txt", b"x" * 1_000_000), "max_tokens": "321"},
    )
    handler = DocumentUploadHandler(request)
    request.upload_handlers.insert(0, handler)
    assert request.FILES["file"].size == 10_001  # enough to know it is too large
    assert handler.size_of("file", request.FILES["file"]) == 1_000_000
    assert request.POST["max_tokens"] == "321"


# --- PDFs ----------------------------------------------------------------------------
def test_a_pdf_over_the_page_limit_is_refused(alice, settings):
    settings.JOB_PDF_MAX_PAGES = 5
    upload = SimpleUploadedFile("long.pdf", pdf_of_pages(6, ["A page of the report."]))
    assert_refused_keeping_the_form(
        post_job(alice, upload), "long.pdf has 6 pages; the limit is 5."
    )


def test_a_pdf_that_takes_too_long_to_read_is_refused(alice, settings):
    settings.JOB_PDF_READ_BUDGET_S = 0.05
    lines = [
        f"Line {n} of a long page of the annual report, with numbers {n * 7}." for n in range(50)
    ]
    upload = SimpleUploadedFile("slow.pdf", pdf_of_pages(400, lines))
    response = post_job(alice, upload)
    assert_refused_keeping_the_form(
        response, "Reading the text of slow.pdf took longer than 0.05 s"
    )
    assert "of 400 pages were read" in response.content.decode()


def test_a_pdf_within_the_limits_is_read(alice, settings):
    settings.JOB_PDF_MAX_PAGES = 5
    upload = SimpleUploadedFile("short.pdf", pdf_of_pages(5, ["A page of the report."]))
    response = post_job(alice, upload)
    assert response.status_code == 302
    assert Job.objects.get().document.count("A page of the report.") == 5


# --- request bodies, as the ASGI server hands them over --------------------------------
def request_to(path: str, chunks: list[bytes], declared: int | None = None, answer=None):
    """Send a POST body chunk by chunk to the real ASGI application; return the
    response status and how many chunks it had taken when it answered. `answer`, a
    list, gets the response's start and body messages."""
    from mixtralweb.asgi import application

    headers = [(b"host", b"testserver"), (b"content-type", b"application/json")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }

    async def run():
        app = ApplicationCommunicator(application, scope)
        sent = 0
        for i, chunk in enumerate(chunks):
            await app.send_input(
                {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
            )
            sent += 1
            if not await app.receive_nothing(timeout=0.5):
                break
        start = await app.receive_output(timeout=10)
        if answer is not None:
            answer.extend([start, await app.receive_output(timeout=10)])
        await app.wait(timeout=10)
        return start["status"], sent

    return async_to_sync(run)()


MB = b"x" * 1_000_000


def test_a_big_body_is_refused_as_soon_as_it_crosses_the_limit(settings):
    status, sent = request_to("/v1/chat/completions", [MB] * 10)
    assert status == 413
    assert sent == 3, "the limit is 2.6 MB: the third megabyte crosses it"


def test_a_body_that_declares_too_much_is_refused_before_it_is_read(settings):
    status, sent = request_to("/v1/chat/completions", [MB] * 10, declared=10_000_000)
    assert status == 413 and sent == 1


def test_the_api_file_upload_takes_a_batch_file_and_refuses_more_in_openais_shape(settings):
    status, _ = request_to("/v1/files", [MB] * 10, declared=10_000_000)
    assert status != 413  # the view answers it (here: no key, 401)
    answer = []
    status, sent = request_to("/v1/files", [MB] * 11, declared=11_000_000, answer=answer)
    assert status == 413 and sent == 1
    assert (b"content-type", b"application/json") in answer[0]["headers"]
    error = json.loads(answer[1]["body"])["error"]
    assert error["code"] == "request_too_large" and "10.1 MB" in error["message"]


@pytest.mark.django_db
def test_the_job_form_takes_a_body_as_large_as_a_document(settings):
    status, _ = request_to("/jobs/new/", [MB] * 10, declared=10_000_000)
    assert status != 413  # Django answers it (here: log in first)


def test_the_job_form_still_checks_the_csrf_token(db, django_user_model):
    """Its upload handler is installed before the token is read, by the pattern
    Django documents (csrf_exempt outside, csrf_protect inside)."""
    register_smollm2()
    client = Client(enforce_csrf_checks=True)
    client.force_login(django_user_model.objects.create_user("alice"))
    response = client.post("/jobs/new/", {"instruction": INSTRUCTION, "text": "Some text."})
    assert response.status_code == 403
    assert Job.objects.count() == 0
