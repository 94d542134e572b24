"""A cap on the size of every HTTP request body, enforced as the body arrives.

Django's ASGI handler reads a whole body (to memory, then a temporary file) before
any view runs, and DATA_UPLOAD_MAX_MEMORY_SIZE is one number for every URL. This
middleware sits in front of it: the job form, which takes documents, may send up to
JOB_FORM_BODY_MAX_BYTES; the API's file upload BATCH_FILES_BODY_MAX_BYTES; a
conversation's import CONVERSATION_IMPORT_BODY_MAX_BYTES; every
other URL REQUEST_BODY_MAX_BYTES, Django's default.
A body that declares more is refused at once with 413; one that sends more without
saying so is refused as soon as it crosses the cap, and Django sees a disconnect.
A proxy in front (client_max_body_size in nginx) should have the same caps: the
ASGI server itself may buffer a body before this sees it.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.urls import reverse


def body_limit_bytes(path: str) -> int:
    if path == reverse("job_new"):
        return settings.JOB_FORM_BODY_MAX_BYTES
    if path == reverse("api_files"):
        return settings.BATCH_FILES_BODY_MAX_BYTES
    if path == reverse("conversation_import"):
        return max(settings.CONVERSATION_IMPORT_BODY_MAX_BYTES, settings.REQUEST_BODY_MAX_BYTES)
    return settings.REQUEST_BODY_MAX_BYTES


def _megabytes(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


class BodySizeLimit:
    """ASGI middleware for the "http" protocol."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = body_limit_bytes(scope["path"])
        api = scope["path"].startswith("/v1/")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit, api)
            return None
        received = 0
        refused = False

        async def receive_within_limit():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    await self._refuse(send, limit, api)
                    return {"type": "http.disconnect"}
            return message

        return await self.app(scope, receive_within_limit, send)

    @staticmethod
    async def _refuse(send, limit: int, api: bool) -> None:
        message = (
            f"The request is larger than {_megabytes(limit)}, the most this address "
            "accepts. Nothing was saved."
        )
        content_type = b"text/plain; charset=utf-8"
        body = message.encode()
        if api:  # in OpenAI's error shape (inference/openai_api/errors.py), for clients
            content_type = b"application/json"
            error = {"message": message, "type": "invalid_request_error"}
            body = json.dumps({"error": error | {"param": None, "code": "request_too_large"}})
            body = body.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
