"""The Files and Batches endpoints (docs/api.md): thin async views over
inference/jobs/batches.py, which runs every batch as a job."""

from __future__ import annotations

from django.http import HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError

from ..jobs import batches
from . import parsing
from .errors import bad_request
from .follow import on_a_pooled_thread
from .views import api_view


@api_view("POST")
async def files(request, key):
    """Upload a batch's input file (multipart: file, purpose)."""

    def create() -> dict:
        try:
            upload, purpose = request.FILES.get("file"), request.POST.get("purpose")
        except MultiPartParserError:
            raise bad_request(
                "Send the file as multipart/form-data with the fields file and purpose.", "file"
            ) from None
        return batches.file_object(
            batches.file_create(user=key.user, upload=upload, purpose=purpose)
        )

    return JsonResponse(await on_a_pooled_thread(create)())


@api_view("GET")
async def file_content(request, key, file_id: str):
    """The file's bytes, for its owner only."""

    def read() -> bytes:
        file = batches.get_file(key.user, file_id)
        with file.content.open("rb") as stored:
            return stored.read()

    return HttpResponse(await on_a_pooled_thread(read)(), content_type="application/jsonl")


@api_view("POST")
async def batch_create(request, key):
    body = parsing.load_json(request.body)

    def create() -> dict:
        return batches.batch_object(batches.batch_create(key=key, body=body))

    return JsonResponse(await on_a_pooled_thread(create)())


@api_view("GET")
async def batch_detail(request, key, batch_id: str):
    def read() -> dict:
        return batches.batch_object(batches.get_batch(key.user, batch_id))

    return JsonResponse(await on_a_pooled_thread(read)())


@api_view("POST")
async def batch_cancel(request, key, batch_id: str):
    def cancel() -> dict:
        return batches.batch_object(batches.batch_cancel(user=key.user, batch_id=batch_id))

    return JsonResponse(await on_a_pooled_thread(cancel)())
