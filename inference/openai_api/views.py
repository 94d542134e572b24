"""The API's endpoints. Async views: a streamed answer holds no thread while it waits.

Each request is authenticated by its API key, validated, checked against the context
size and the quotas, and becomes a Generation on the model's Celery queue, as a chat
turn does. The answer follows the generation's events (follow.py).
"""

from __future__ import annotations

import functools
import json
from contextlib import aclosing, asynccontextmanager

from asgiref.sync import sync_to_async
from django.db import transaction
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from inference.quotas import QuotaExceeded, check_quota
from mixtralweb.accounts.models import ApiKey, ApiKeyExpired

from .. import services, tool_calls
from ..models import Generation
from ..tokens import ChatTemplateError, count_chat_tokens, count_text_tokens
from . import parsing
from .errors import ApiError, bad_request, model_error, rate_limited, unauthorized
from .follow import Text, follow, on_a_pooled_thread

CHAT = "chat"
TEXT = "text"


def api_view(method: str):
    """CSRF-exempt (keys, not cookies, authenticate), one method, errors as JSON."""

    def decorate(view):
        @csrf_exempt
        @functools.wraps(view)
        async def wrapper(request, *args, **kwargs):
            if request.method != method:
                return ApiError(
                    405, f"Use {method} for {request.path}.", code="method_not_allowed"
                ).response()
            try:
                key = await authenticate(request)
                return await view(request, key, *args, **kwargs)
            except ApiError as exc:
                return exc.response()

        return wrapper

    return decorate


async def authenticate(request) -> ApiKey:
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise unauthorized(
            "No API key given. Send it as 'Authorization: Bearer <key>'; "
            "create one on your account's API keys page."
        )
    try:
        key = await on_a_pooled_thread(ApiKey.authenticate)(secret.strip())
    except ApiKeyExpired as exc:
        # code stays OpenAI's invalid_api_key, which clients know; the message says why.
        raise unauthorized(f"{exc} Create a new key on your account's API keys page.") from None
    if key is None:
        raise unauthorized("Incorrect or revoked API key.")
    return key


@api_view("GET")
async def models(request, key):
    """The models a request can use now: those a live worker serves, as in the chat."""
    names = await sync_to_async(lambda: list(services.serving_models()))()
    return JsonResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": model.name,
                    "object": "model",
                    "created": int(model.created_at.timestamp()),
                    "owned_by": "workbench",
                    "context_length": model.n_ctx,
                }
                for model in names
            ],
        }
    )


@api_view("POST")
async def chat_completions(request, key):
    return await _complete(request, key, CHAT)


@api_view("POST")
async def completions(request, key):
    return await _complete(request, key, TEXT)


async def _complete(request, key: ApiKey, kind: str):
    body = parsing.load_json(request.body)
    parsed = parsing.parse_chat(body) if kind == CHAT else parsing.parse_completion(body)
    gen, counted = await on_a_pooled_thread(start_generation)(key=key, parsed=parsed)
    if parsed.stream:
        response = StreamingHttpResponse(
            _sse(gen, key, parsed, kind, counted), content_type="text/event-stream"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # a proxy must not hold the stream back
        return response
    text, final = "", None
    async with stopped_if_abandoned(gen, key), aclosing(follow(gen.pk)) as items:
        async for item in items:
            if isinstance(item, Text):
                text += item.text
            else:
                final = item.event
    _raise_if_failed(final)
    return JsonResponse(_whole_answer(gen, kind, text, final, counted))


@transaction.atomic
def start_generation(*, key: ApiKey, parsed: parsing.ApiRequest) -> tuple[Generation, int | None]:
    """Check the model, the context and the quotas; queue the generation. Returns it
    with its prompt tokens as counted here (None if they could not be)."""
    try:
        model = services.get_model(parsed.model)
    except services.ChatError as exc:
        raise model_error(exc) from None
    params = dict(parsed.params)
    prompt_tokens = _count_prompt_tokens(model, parsed)
    if prompt_tokens is not None:
        _check_context(model, prompt_tokens, params, parsed)
    try:
        check_quota(user=key.user, api_key=key, source=Generation.SOURCE_API)
    except QuotaExceeded as exc:
        raise rate_limited(str(exc), exc.retry_after_s) from None
    gen = Generation.objects.create(
        user=key.user,
        model=model,
        source=Generation.SOURCE_API,
        api_key_name=key.name,
        input_messages=parsed.messages or [],
        prompt_text=parsed.prompt or "",
        params=params,
    )
    services.generation_enqueue(gen)
    return gen, prompt_tokens


def _count_prompt_tokens(model, parsed: parsing.ApiRequest) -> int | None:
    """As the worker will count them; None where this host cannot read the model's
    file (workers on other machines): the worker then refuses an overflow itself."""
    try:
        if parsed.prompt is not None:
            return count_text_tokens(model, parsed.prompt)
        return count_chat_tokens(model, parsed.messages, tool_calls.tool_defs(parsed.params))
    except OSError:
        return None
    except ChatTemplateError as exc:
        raise bad_request(str(exc), param="messages", code="invalid_messages") from None


def _check_context(model, prompt_tokens: int, params: dict, parsed) -> None:
    """Refuse a prompt that cannot fit; shorten a default max_tokens that would not."""
    room = model.n_ctx - prompt_tokens
    if parsed.max_tokens_given and params["max_tokens"] > room or room < 1:
        requested = prompt_tokens + (params["max_tokens"] if parsed.max_tokens_given else 1)
        raise bad_request(
            f"This model's maximum context length is {model.n_ctx} tokens. However, you "
            f"requested {requested} tokens ({prompt_tokens} in the "
            f"{'messages' if parsed.messages is not None else 'prompt'}, "
            f"{requested - prompt_tokens} in the completion). Please reduce the length of "
            "the input or of max_tokens.",
            param="messages" if parsed.messages is not None else "prompt",
            code="context_length_exceeded",
        )
    params["max_tokens"] = min(params["max_tokens"], room)


@asynccontextmanager
async def stopped_if_abandoned(gen: Generation, key: ApiKey):
    """Stop the generation if following it ends early: the client hung up (the server
    cancels the request, or closes the stream) and the GPU is shared."""
    try:
        yield
    except BaseException:
        await sync_to_async(services.generation_stop)(user=key.user, generation_id=gen.pk)
        raise


def _failure(final: dict) -> ApiError:
    return ApiError(
        500,
        f"The generation failed: {final['reason'] or 'no reason was given'}",
        type="server_error",
        code="generation_failed",
    )


def _raise_if_failed(final: dict) -> None:
    if final["state"] == Generation.FAILED:
        raise _failure(final)


def _finish_reason(final: dict, calls: tool_calls.Answer | None = None) -> str:
    if calls is not None:
        return "tool_calls"
    return "length" if final.get("finish_reason") == "length" else "stop"


def _tool_calls(gen: Generation, answer: tool_calls.Answer) -> list[dict]:
    """OpenAI's shape; ids from the generation's own, the same on every reading."""
    return [
        {
            "id": f"call_{gen.pk}_{index}",
            "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]},
        }
        for index, call in enumerate(answer.calls)
    ]


def _usage(final: dict, counted: int | None) -> dict:
    """As the worker counted; a generation that never ran has only the web's count."""
    metrics = final.get("metrics") or {}
    prompt = metrics.get("prompt_tokens")
    if prompt is None:
        prompt = counted or 0
    completion = metrics.get("completion_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _ids(gen: Generation, kind: str) -> dict:
    return {
        "id": f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{gen.pk}",
        "created": int(gen.queued_at.timestamp()),
        "model": gen.model.name,
    }


def _whole_answer(gen: Generation, kind: str, text: str, final: dict, counted) -> dict:
    # With tools shown to the model (its params say), the answer may be calls.
    tools = gen.params.get("tools") if kind == CHAT else None
    calls = tool_calls.parse_calls(text, tools) if tools else None
    if calls is not None:
        # Text the model wrote before its calls (auto) is the message's content.
        message = {
            "role": "assistant",
            "content": calls.content,
            "tool_calls": _tool_calls(gen, calls),
        }
        choice = {"index": 0, "message": message}
        obj = "chat.completion"
    elif kind == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
        obj = "text_completion"
    choice["finish_reason"] = _finish_reason(final, calls)
    return {**_ids(gen, kind), "object": obj, "choices": [choice], "usage": _usage(final, counted)}


def _chunk(
    gen: Generation, kind: str, piece: str | None, finish_reason=None, first=False, calls=None
) -> dict:
    if kind == CHAT:
        delta = {} if piece is None else {"content": piece}
        if calls is not None:
            delta = {"tool_calls": calls}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece or "", "logprobs": None}
        obj = "text_completion"
    choice["finish_reason"] = finish_reason
    return {**_ids(gen, kind), "object": obj, "choices": [choice], "usage": None}


def _event(data) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def _sse(gen: Generation, key: ApiKey, parsed: parsing.ApiRequest, kind: str, counted):
    """Server-sent events: a chunk per piece of text, a last chunk with the finish
    reason (and usage), the usage chunk if asked for, then [DONE].

    With tools, text that may turn out to be calls is held back (tool_calls.sendable)
    until the answer ends: then it is either calls, sent as delta.tool_calls (a chunk
    with each call's id and name, one with its arguments), or text after all."""
    tools = parsed.params.get("tools") if kind == CHAT else None
    text, sent = "", 0
    async with stopped_if_abandoned(gen, key), aclosing(follow(gen.pk)) as items:
        if kind == CHAT:
            yield _event(_chunk(gen, kind, "", first=True))
        async for item in items:
            if isinstance(item, Text):
                if not tools:
                    yield _event(_chunk(gen, kind, item.text))
                    continue
                text += item.text
                ready = tool_calls.sendable(text)
                if ready > sent:
                    yield _event(_chunk(gen, kind, text[sent:ready]))
                    sent = ready
                continue
            final = item.event
        if final["state"] == Generation.FAILED:
            yield _event(_failure(final).body())
            return
        calls = tool_calls.parse_calls(text, tools) if tools else None
        # What was held back: text, or blank before the calls (then left out).
        rest = text[sent : calls.start if calls else len(text)]
        if rest.strip() or (rest and not calls):
            yield _event(_chunk(gen, kind, rest))
        for index, call in enumerate(_tool_calls(gen, calls) if calls else ()):
            opening = {**call, "index": index, "function": {**call["function"]}}
            opening["function"]["arguments"] = ""
            yield _event(_chunk(gen, kind, None, calls=[opening]))
            arguments = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
            yield _event(_chunk(gen, kind, None, calls=[arguments]))
        usage = _usage(final, counted)
        last = _chunk(gen, kind, None, finish_reason=_finish_reason(final, calls))
        # usage on the last chunk always: every response carries it.
        last["usage"] = usage
        yield _event(last)
        if parsed.include_usage:
            yield _event(
                {**_ids(gen, kind), "object": last["object"], "choices": [], "usage": usage}
            )
        yield _event("[DONE]")
