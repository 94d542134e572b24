"""Tool calls (OpenAI's `tools`): how tools reach the model, the grammar its answer
follows, and how a call is read back out of the answer's text.

A chat template that renders `tools` itself, in a call format read here, gets the
tools, the calls and their results as it expects them, and the model answers in
its own format: Mistral's v3 tokenizer (Mixtral 8x22B Instruct: [AVAILABLE_TOOLS],
[TOOL_CALLS] and a JSON array, [TOOL_RESULTS]) or Qwen's and Hermes's (<tool_call>
JSON). Any other template (ChatML without tools, SmolLM2's) gets them as text it
can read: the tools described in the system prompt, earlier calls as
`<tool_call>{...}</tool_call>` and their results as `<tool_response>` user turns.
Either way a grammar holds each call to a call object of a given function
({"name": ..., "arguments": {...}}, the arguments following the function's
parameters schema): from the answer's first token for tool_choice "required" or a
named function, from where the answer opens a call for "auto" (free text before
that). The Generation keeps the answer's raw text; the API reads calls out of it
(parse_calls)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from .structured_output import grammar_for_schema

AUTO, REQUIRED, NONE = "auto", "required", "none"
# The call formats of templates that render tools themselves, as this module reads
# them; a template in another format (Llama 3.1's "parameters") gets the fallback.
MISTRAL, HERMES = "mistral", "hermes"

# The fallback format, after Hermes/Qwen's, which ChatML models have seen most.
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
# Mistral v3's: a control token, then a JSON array of calls. The worker writes the
# answer's text without control tokens, so the text holds the array alone.
MISTRAL_CALLS = "[TOOL_CALLS]"

FALLBACK_PROMPT = (
    "You can call these functions, one JSON object each:\n{tools}\n\n"
    "To call a function, answer with only "
    + CALL_OPEN
    + '{{"name": <function name>, "arguments": <arguments as a JSON object>}}'
    + CALL_CLOSE
    + ". Its result comes back in a "
    + RESULT_OPEN
    + " message. Call a function when it helps; otherwise answer in plain text."
)


def call_format(probe_prompt: str) -> str | None:
    """The format of a template's calls, from its prompt with a probe tool: None
    where it shows no tools, or in a format read nowhere here."""
    if "[AVAILABLE_TOOLS]" in probe_prompt:
        return MISTRAL
    if CALL_OPEN in probe_prompt:  # Qwen's, Hermes's: ChatML with <tool_call> JSON
        return HERMES
    return None


def tool_defs(params: dict) -> list[dict]:
    """The functions shown to the model ([] for tool_choice "none" or no tools)."""
    return list(params.get("tools") or [])


def template_tools(functions: Sequence[dict]) -> list[dict]:
    """The tools as chat templates take them (OpenAI's request shape)."""
    return [{"type": "function", "function": dict(f)} for f in functions]


def native_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages for a template that renders tools itself: calls' arguments as
    objects (as Hugging Face templates expect) and call ids of nine letters and
    digits (Mistral's templates refuse others), the same for a call and its result."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {
                    "id": short_id(call["id"]),
                    "type": "function",
                    "function": {
                        "name": call["function"]["name"],
                        "arguments": _arguments(call["function"]["arguments"]),
                    },
                }
                for call in message["tool_calls"]
            ]
        if message.get("role") == "tool":
            message["tool_call_id"] = short_id(message["tool_call_id"])
        out.append(message)
    return out


def short_id(call_id: str) -> str:
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def fallback_messages(messages: Sequence[dict], functions: Sequence[dict]) -> list[dict]:
    """Messages for a template without tools: plain {role, content} turns. The
    system prompt is the same whatever tool_choice says (the grammar enforces it),
    so the next turn of a conversation reuses the cached prompt."""
    names = {}
    out = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                names[call["id"]] = call["function"]["name"]
                calls.append(
                    CALL_OPEN
                    + json.dumps(
                        {
                            "name": call["function"]["name"],
                            "arguments": _arguments(call["function"]["arguments"]),
                        }
                    )
                    + CALL_CLOSE
                )
            text = "\n".join([message["content"], *calls] if message.get("content") else calls)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            result = {"name": names.get(message["tool_call_id"], ""), "result": message["content"]}
            out.append({"role": "user", "content": RESULT_OPEN + json.dumps(result) + RESULT_CLOSE})
        else:
            out.append({"role": role, "content": message["content"]})
    if functions:
        described = "\n".join(json.dumps(f) for f in functions)
        prompt = FALLBACK_PROMPT.format(tools=described)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _arguments(arguments):
    """A call's arguments as an object ({} where the string is not JSON: it was
    checked when the request came in, so that is only an old row's)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return {}
    return arguments


def call_schema(functions: Sequence[dict], choice) -> dict:
    """The JSON Schema of one call object: one alternative per allowed function."""
    if isinstance(choice, dict):
        functions = [f for f in functions if f["name"] == choice["name"]]
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object", "properties": {}},
            },
            "required": ["name", "arguments"],
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def grammar(params: dict, format: str | None) -> tuple[str | None, tuple[str, ...]]:
    """The grammar for a request with tools (None: no tools shown), and the
    patterns that wake it: for tool_choice "auto" the answer is free text until it
    opens a call (llama.cpp's lazy grammar), and costs nothing while it is text;
    "required" and a named function hold it to a call from its first token.
    format: the template's call format (call_format); None: the fallback's."""
    functions = tool_defs(params)
    if not functions:
        return None, ()
    choice = params.get("tool_choice", AUTO)
    # The converter's rules for one call object, its root renamed so that it can be
    # one rule of the larger grammar (names the converter does not give).
    lines = grammar_for_schema(call_schema(functions, choice)).splitlines()
    rules = [
        "tool-call-object ::= " + line.removeprefix("root ::= ")
        if line.startswith("root ::= ")
        else line
        for line in lines
    ]
    if format == MISTRAL:
        several = params.get("parallel_tool_calls", True)
        more = ' ("," tool-ws tool-call-object)*' if several else ""
        root = f'root ::= "{MISTRAL_CALLS}" tool-ws "[" tool-ws tool-call-object{more} "]"'
        trigger = r"\[TOOL_CALLS\]"
    else:
        root = f'root ::= "{CALL_OPEN}" tool-ws tool-call-object tool-ws "{CALL_CLOSE}"'
        trigger = CALL_OPEN
    text = "\n".join([root, "tool-ws ::= [ \\n]?", *rules]) + "\n"
    return text, ((trigger,) if choice == AUTO else ())


@dataclass
class Answer:
    """An answer read as calls: the text before them (None if blank), the calls as
    [{"name", "arguments": <JSON text>}], and where in the text they begin."""

    content: str | None
    calls: list[dict]
    start: int


def parse_calls(text: str, functions: Sequence[dict]) -> Answer | None:
    """The answer as calls, or None where it is text (or a call cut short).
    Either format is read: <tool_call> blocks after any text, or a Mistral call
    array that is the whole answer (its [TOOL_CALLS] token is not in the text)."""
    names = {f["name"] for f in functions}
    start = text.find(CALL_OPEN)
    found = []
    if start >= 0:
        body = text[start:].strip()
        while body.startswith(CALL_OPEN):
            inner, sep, body = body[len(CALL_OPEN) :].partition(CALL_CLOSE)
            if not sep:
                return None
            found.append(inner)
            body = body.strip()
        if body:
            return None
    else:
        start = len(text) - len(text.lstrip())
        body = text.strip().removeprefix(MISTRAL_CALLS).strip()
        if not body.startswith(("[", "{")):
            return None
        found.append(body)
    calls = []
    for item in found:
        try:
            value = json.loads(item)
        except ValueError:
            return None
        for call in value if isinstance(value, list) else [value]:
            if (
                not isinstance(call, dict)
                or call.get("name") not in names
                or not isinstance(call.get("arguments"), dict)
            ):
                return None
            calls.append({"name": call["name"], "arguments": json.dumps(call["arguments"])})
    if not calls:
        return None
    content = text[:start] if text[:start].strip() else None
    return Answer(content, calls, start)


def sendable(text: str) -> int:
    """How much of an answer so far a stream can send as text now: all but what
    may turn out to be calls (an answer that opens with "[" or "{", or from a
    <tool_call>, or a tail that may be the start of one)."""
    body = text.lstrip()
    if not body or body[0] in "[{":
        return 0
    start = text.find(CALL_OPEN)
    if start >= 0:
        return start
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-size:]):
            return len(text) - size
    return len(text)
