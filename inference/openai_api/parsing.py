"""Reads an OpenAI request body into what a Generation needs, or says what is wrong.

Fields this server does not implement (tools, logprobs, penalties...) are ignored,
as OpenAI-compatible servers commonly do, except those that would change the shape
of the answer (n > 1), which are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from django.conf import settings

from .. import services
from .errors import bad_request

ROLES = {"system", "user", "assistant", "developer"}
MAX_STOP_STRINGS = 4


@dataclass
class ApiRequest:
    model: str
    messages: list[dict] | None = None  # chat
    prompt: str | None = None  # completions
    params: dict = field(default_factory=dict)  # sampling, as services.clean_params gives
    max_tokens_given: bool = False
    stream: bool = False
    include_usage: bool = False


def load_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"")
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def parse_chat(body: dict) -> ApiRequest:
    request = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array.", "messages")
    request.messages = [_message(m, i) for i, m in enumerate(messages)]
    return request


def parse_completion(body: dict) -> ApiRequest:
    request = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("prompt must be a string (one prompt per request).", "prompt")
    if not prompt:
        raise bad_request("prompt is empty.", "prompt")
    _check_size(len(prompt), "prompt")
    request.prompt = prompt
    return request


def _common(body: dict) -> ApiRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: one of the names /v1/models lists.", "model")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise bad_request("Only n=1 is supported.", "n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object.", "stream_options")

    # max_completion_tokens is the newer name of max_tokens in chat completions.
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    sampling = {
        "max_tokens": max_tokens,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "seed": body.get("seed"),
    }
    given = {name: value for name, value in sampling.items() if value is not None}
    try:
        params = services.clean_params(given)
    except services.ChatError as exc:
        raise bad_request(str(exc), _param_named_in(str(exc), given)) from None
    params["stop"] = _stop(body.get("stop"))
    return ApiRequest(
        model=model,
        params=params,
        max_tokens_given="max_tokens" in given,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def _param_named_in(message: str, given: dict) -> str | None:
    return next((name for name in given if message.startswith(name)), None)


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad_request(
            f"stop must be a string or an array of up to {MAX_STOP_STRINGS} non-empty strings.",
            "stop",
        )
    return stop


def _message(message, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{param} must be an object with role and content.", param)
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(
            f"{param}.role must be one of {', '.join(sorted(ROLES))}.", f"{param}.role"
        )
    content = message.get("content")
    if isinstance(content, list):
        # Content parts: only text is understood by a text model.
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(f"{param}.content: only text parts are supported.", param)
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad_request(f"{param}.content must be a string.", f"{param}.content")
    _check_size(len(content), f"{param}.content")
    # Chat templates know "system"; "developer" is OpenAI's newer name for it.
    return {"role": "system" if role == "developer" else role, "content": content}


def _check_size(chars: int, param: str) -> None:
    if chars > settings.CHAT_MESSAGE_MAX_CHARS:
        raise bad_request(
            f"{param} is {chars:,} characters; the limit is {settings.CHAT_MESSAGE_MAX_CHARS:,}.",
            param,
        )
