"""Reads an OpenAI request body into what a Generation needs, or says what is wrong.

Nothing a request asks for is dropped without a word: every field of OpenAI's
chat/completions and completions bodies is honoured, refused with a 400 that names
it, or (only where it cannot change what the answer says) accepted and ignored, as
the tables below and docs/api.md list. A field OpenAI does not define is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from django.conf import settings

from .. import services
from ..structured_output import JSON_OBJECT_GRAMMAR, UnsupportedSchema, grammar_for_schema
from ..tool_calls import AUTO, NONE, REQUIRED
from .errors import bad_request

ROLES = {"system", "user", "assistant", "developer", "tool"}
MAX_STOP_STRINGS = 4

# Fields both endpoints read.
HONOURED = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
HONOURED |= {"stream_options", "n", "response_format"}
HONOURED_CHAT = HONOURED | {"messages", "max_completion_tokens"}
HONOURED_CHAT |= {"tools", "tool_choice", "parallel_tool_calls"}
HONOURED_TEXT = HONOURED | {"prompt"}
# Accepted and ignored: bookkeeping and hints that cannot change what the answer says.
IGNORED = {"user", "store", "metadata", "service_tier", "safety_identifier"}
IGNORED |= {"prompt_cache_key", "prompt_cache_retention", "prediction"}
# Accepted only at the value that turns them off; any other would change the answer.
OFF_VALUES = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "modalities": (["text"],),
    "audio": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
}
CHAT_ONLY = {"audio", "modalities", "top_logprobs", "reasoning_effort", "verbosity"}
CHAT_ONLY |= {"web_search_options", "prediction", "parallel_tool_calls", "store", "metadata"}
CHAT_ONLY |= {"service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention"}
TEXT_ONLY = {"best_of", "echo", "suffix"}
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")
# OpenAI's names from before tools, deprecated: refused, saying what replaces them.
DEPRECATED = "deprecated; use tools and tool_choice"
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
STREAM_OPTIONS = {"include_usage"}
STREAM_OPTIONS_IGNORED = {"include_obfuscation"}  # padding against a side channel


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
    _check_fields(body, HONOURED_CHAT, TEXT_ONLY)
    request = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array.", "messages")
    request.messages = [_message(m, i) for i, m in enumerate(messages)]
    _check_tool_results(request.messages)
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("parallel_tool_calls must be true or false.", "parallel_tool_calls")
    if tools and choice != NONE:
        if "grammar" in request.params:
            raise bad_request(
                "response_format cannot be combined with tools: the answer is either a "
                'tool call or text. Leave one out, or set tool_choice to "none".',
                "response_format",
            )
        # The worker shows these to the model and builds the answer's grammar.
        request.params["tools"] = tools
        request.params["tool_choice"] = choice
        request.params["parallel_tool_calls"] = parallel is not False
    return request


def _tools(tools) -> list[dict]:
    """The request's functions as {name, description?, parameters}, each checked
    (its parameters schema must be one the grammar can enforce)."""
    if tools is None or tools == []:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools must be an array of function tools.", "tools")
    found: list[dict] = []
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(
                f'{param}: only {{"type": "function", "function": {{...}}}} tools are supported.',
                param,
            )
        for name in set(tool) - {"type", "function"}:
            raise bad_request(f"{param}.{name} is not supported.", f"{param}.{name}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"{param}.function must be an object.", f"{param}.function")
        for name in set(function) - FUNCTION_KEYS:
            raise bad_request(
                f"{param}.function.{name} is not supported.", f"{param}.function.{name}"
            )
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise bad_request(
                f"{param}.function.name must be 1 to 64 letters, digits, _ or -.",
                f"{param}.function.name",
            )
        if any(f["name"] == name for f in found):
            raise bad_request(f"{param}.function.name: {name} is defined twice.", "tools")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_request(
                f"{param}.function.description must be a string.",
                f"{param}.function.description",
            )
        # strict: the grammar holds the arguments to the schema, strict or not.
        if not isinstance(function.get("strict", False), (bool, type(None))):
            raise bad_request(
                f"{param}.function.strict must be true or false.", f"{param}.function.strict"
            )
        # No parameters: a function that takes none (OpenAI's reading).
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise bad_request(
                f"{param}.function.parameters must be a JSON Schema of an object.",
                f"{param}.function.parameters",
            )
        try:
            grammar_for_schema(parameters)
        except UnsupportedSchema as exc:
            message = str(exc).removeprefix("schema")
            raise bad_request(
                f"{param}.function.parameters{message}", f"{param}.function.parameters"
            ) from None
        _check_size(len(json.dumps(function)), param)
        entry = {"name": name, "parameters": parameters}
        if description:
            entry["description"] = description
        found.append(entry)
    return found


def _tool_choice(choice, tools: list[dict]):
    """The choice as params keep it: "none", "auto", "required", or {"name": ...}
    (that function, forced)."""
    if choice is None:
        return AUTO if tools else NONE
    if choice == NONE:
        return NONE
    if not tools:
        raise bad_request("tool_choice is only allowed when tools are given.", "tool_choice")
    if choice in (AUTO, REQUIRED):
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(function, dict)
        or set(choice) - {"type", "function"}
    ):
        raise bad_request(
            'tool_choice must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}.',
            "tool_choice",
        )
    name = function.get("name")
    if not any(f["name"] == name for f in tools):
        raise bad_request(
            f"tool_choice names {name!r}, which tools does not define.", "tool_choice"
        )
    return {"name": name}


def _check_tool_results(messages: list[dict]) -> None:
    """Each tool message answers a call an earlier assistant message made."""
    calls = set()
    for index, message in enumerate(messages):
        calls |= {call["id"] for call in message.get("tool_calls", ())}
        if message["role"] == "tool" and message["tool_call_id"] not in calls:
            raise bad_request(
                f"messages[{index}].tool_call_id: no earlier assistant message made the call "
                f"{message['tool_call_id']!r}.",
                f"messages[{index}].tool_call_id",
            )


def parse_completion(body: dict) -> ApiRequest:
    _check_fields(body, HONOURED_TEXT, CHAT_ONLY | set(TOOL_FIELDS))
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
    for name in set(options) - STREAM_OPTIONS - STREAM_OPTIONS_IGNORED:
        raise bad_request(f"stream_options.{name} is not supported.", f"stream_options.{name}")

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
    grammar = _grammar(body.get("response_format"))
    if grammar:
        params["grammar"] = grammar
    return ApiRequest(
        model=model,
        params=params,
        max_tokens_given="max_tokens" in given,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


def _check_fields(body: dict, honoured: set, elsewhere: set) -> None:
    """A 400 for the first field given (not null) that this endpoint would not honour."""
    for name, value in body.items():
        if value is None or name in honoured:
            continue
        known = name in IGNORED or name in OFF_VALUES or name in TOOL_FIELDS
        if name in elsewhere or not known:
            raise bad_request(f"Unrecognized request field for this endpoint: {name}.", name)
        if name in IGNORED or _is_off(value, OFF_VALUES.get(name, ("none", []))):
            continue
        if name in TOOL_FIELDS:
            raise bad_request(f"{name} is {DEPRECATED}.", name)
        raise bad_request(f"{name} is not supported by this server; leave it out.", name)


def _is_off(value, off_values) -> bool:
    # A bool is not the number 0 here (logprobs: false in chat, 0 in completions).
    return any(
        value == off and isinstance(value, bool) == isinstance(off, bool) for off in off_values
    )


def _grammar(response_format) -> str | None:
    """The grammar response_format asks the answer to follow (None: plain text)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_GRAMMAR
    if kind != "json_schema":
        raise bad_request(
            'response_format must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {...}}.',
            "response_format",
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad_request(
            "response_format.json_schema must be an object with a name and a schema.",
            "response_format",
        )
    # strict: the grammar always holds the answer to the schema, strict or not.
    for name in set(spec) - {"name", "schema", "strict", "description"}:
        raise bad_request(
            f"response_format.json_schema.{name} is not supported.", "response_format"
        )
    try:
        return grammar_for_schema(spec.get("schema", {}))
    except UnsupportedSchema as exc:
        raise bad_request(f"response_format.json_schema.{exc}", "response_format") from None


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
    if role == "function":
        raise bad_request(f"{param}.role function is {DEPRECATED} (role tool).", f"{param}.role")
    if role not in ROLES:
        raise bad_request(
            f"{param}.role must be one of {', '.join(sorted(ROLES))}.", f"{param}.role"
        )
    for name, value in message.items():
        # Empty values are what clients send back for an answer's unused fields;
        # a participant's name is sent by many agent frameworks and ignored (the chat
        # templates have no place for it; docs/api.md).
        if name in ("role", "content", "name") or value in (None, "", []):
            continue
        if (name, role) in (("tool_calls", "assistant"), ("tool_call_id", "tool")):
            continue
        if name == "function_call":
            raise bad_request(f"{param}.function_call is {DEPRECATED}.", f"{param}.{name}")
        raise bad_request(f"{param}.{name} is not supported.", f"{param}.{name}")
    content = message.get("content")
    calls = _tool_calls(message.get("tool_calls"), param) if role == "assistant" else []
    if calls and content in (None, "", []):
        return {"role": role, "content": None, "tool_calls": calls}
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
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise bad_request(
                f"{param}.tool_call_id is required: the id of the call this answers.",
                f"{param}.tool_call_id",
            )
        return {"role": role, "tool_call_id": call_id, "content": content}
    # Chat templates know "system"; "developer" is OpenAI's newer name for it.
    result = {"role": "system" if role == "developer" else role, "content": content}
    if calls:
        result["tool_calls"] = calls
    return result


def _tool_calls(calls, param: str) -> list[dict]:
    """An assistant message's calls, in OpenAI's shape, checked."""
    if calls in (None, []):
        return []
    if not isinstance(calls, list):
        raise bad_request(f"{param}.tool_calls must be an array.", f"{param}.tool_calls")
    checked = []
    for index, call in enumerate(calls):
        where = f"{param}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("id"), str)
            or not call["id"]
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str)
        ):
            raise bad_request(
                f'{where} must be {{"id": ..., "type": "function", "function": '
                '{"name": ..., "arguments": "<JSON text>"}}.',
                where,
            )
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise bad_request(
                f"{where}.function.arguments must be a JSON object, as text.",
                f"{where}.function.arguments",
            )
        _check_size(len(function["arguments"]), f"{where}.function.arguments")
        checked.append(
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": function["name"], "arguments": function["arguments"]},
            }
        )
    return checked


def _check_size(chars: int, param: str) -> None:
    if chars > settings.CHAT_MESSAGE_MAX_CHARS:
        raise bad_request(
            f"{param} is {chars:,} characters; the limit is {settings.CHAT_MESSAGE_MAX_CHARS:,}.",
            param,
        )
