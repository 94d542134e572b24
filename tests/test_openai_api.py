"""The OpenAI-compatible API, through the official `openai` client, against the live
stack with the real model. Alice calls it with her key "script"."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import timedelta

import openai
import pytest
from django.conf import settings
from django.utils import timezone

from inference import tool_calls
from inference.models import Generation, LanguageModel
from inference.quotas import start_of_day
from inference.tokens import tokenizer_for
from mixtralweb.accounts.models import ApiKey, Quota
from monitoring.models import RequestMetrics


@pytest.fixture
def alice_key(cast, default_model):
    key, secret = ApiKey.issue(user=cast.alice, name="script")
    key.secret = secret
    return key


def client_for(stack, secret: str) -> openai.OpenAI:
    # max_retries=0: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(
        base_url=f"{stack.http_url}/v1", api_key=secret, max_retries=0, timeout=120
    )


@pytest.fixture
def client(stack, alice_key) -> openai.OpenAI:
    return client_for(stack, alice_key.secret)


MODEL = settings.DEFAULT_MODEL_NAME
HELLO = [{"role": "user", "content": "Say hello in five words."}]


def latest_generation() -> Generation:
    return Generation.objects.select_related("metrics").latest("queued_at")


# --- answers ------------------------------------------------------------------------


def test_it_lists_the_enabled_models_a_live_worker_serves(client, default_model):
    LanguageModel.objects.create(name="switched-off", path=default_model.path, enabled=False)
    LanguageModel.objects.create(name="no-worker", path=default_model.path)
    names = [m.id for m in client.models.list()]
    assert names == [MODEL]


def test_it_answers_a_chat_completion_with_usage(client, alice_key):
    answer = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=16, seed=3, temperature=0.2
    )
    gen = latest_generation()
    assert gen.state == Generation.DONE
    assert answer.id == f"chatcmpl-{gen.pk}"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == gen.text != ""
    assert answer.choices[0].finish_reason in {"stop", "length"}
    assert answer.usage.prompt_tokens == gen.metrics.prompt_tokens > 5
    assert answer.usage.completion_tokens == gen.metrics.completion_tokens >= 1
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # Recorded as the key's work, on the same queue and worker as chat.
    assert gen.source == Generation.SOURCE_API and gen.api_key_name == "script"
    assert gen.user == alice_key.user and gen.worker
    assert gen.params["max_tokens"] == 16 and gen.params["seed"] == 3
    alice_key.refresh_from_db()
    assert alice_key.last_used_at is not None


def test_it_streams_a_chat_completion_and_ends_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write two sentences about the sea."}],
        max_tokens=40,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    gen = latest_generation()
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) >= 2, "the answer arrived in one piece, not streamed"
    assert "".join(pieces) == gen.text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason in {"stop", "length"}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == gen.metrics.completion_tokens
    assert usage_chunk.usage.prompt_tokens == gen.metrics.prompt_tokens


def test_a_stream_without_include_usage_still_reports_usage_on_its_last_chunk(client):
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True)
    )
    gen = latest_generation()
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == gen.metrics.completion_tokens
    assert all(c.choices for c in chunks), "no usage-only chunk unless asked for"


def test_it_completes_a_raw_prompt(client):
    answer = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    gen = latest_generation()
    assert gen.prompt_text == "The capital of France is" and gen.input_messages == []
    assert answer.choices[0].text == gen.text != ""
    assert answer.usage.prompt_tokens == gen.metrics.prompt_tokens == 5
    assert answer.usage.completion_tokens == gen.metrics.completion_tokens


def test_it_streams_a_raw_completion(client):
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=12, stream=True
        )
    )
    gen = latest_generation()
    assert "".join(c.choices[0].text for c in chunks if c.choices) == gen.text != ""
    assert chunks[-1].usage.completion_tokens == gen.metrics.completion_tokens


def test_max_tokens_cuts_the_answer_with_finish_reason_length(client):
    answer = client.completions.create(
        model=MODEL, prompt="Count: one, two, three,", max_tokens=4, temperature=0
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 4


def test_a_stop_string_ends_the_answer_before_it(client):
    ask = dict(model=MODEL, prompt="List the days of the week: Monday,", temperature=0, seed=1)
    full = client.completions.create(max_tokens=24, **ask).choices[0].text
    words = [w.strip(" ,.\n") for w in full.split(",") if w.strip(" ,.\n")]
    assert len(words) >= 2, f"the model did not list days: {full!r}"
    stop = words[1]
    cut = client.completions.create(max_tokens=24, stop=[stop], **ask)
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_client_that_hangs_up_stops_its_generation(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        max_tokens=2000,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    gen = latest_generation()
    deadline = time.monotonic() + 30
    # Its metrics are recorded just after its final state is saved.
    while not (gen.is_final and RequestMetrics.objects.filter(generation=gen).exists()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        gen.refresh_from_db()
    assert gen.state == Generation.CANCELLED
    assert gen.metrics.completion_tokens < 2000


# --- structured output ----------------------------------------------------------------

PET = {
    "type": "object",
    "properties": {
        "animal": {"type": "string", "enum": ["cat", "dog", "fish"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "name": {"type": "string", "maxLength": 12},
    },
    "required": ["animal", "legs", "name"],
    "additionalProperties": False,
}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
ASK_PET = [{"role": "user", "content": "Describe a pet as JSON with animal, legs and name."}]


def assert_is_a_pet(text: str) -> None:
    """Validates against PET by hand (no JSON Schema library in the environment)."""
    pet = json.loads(text)
    assert set(pet) == {"animal", "legs", "name"}, pet
    assert pet["animal"] in {"cat", "dog", "fish"}, pet
    assert type(pet["legs"]) is int and 0 <= pet["legs"] <= 8, pet
    assert isinstance(pet["name"], str) and len(pet["name"]) <= 12, pet


def test_a_json_schema_answer_parses_and_matches_the_schema(client):
    answer = client.chat.completions.create(
        model=MODEL, messages=ASK_PET, response_format=PET_FORMAT, max_tokens=200, seed=5
    )
    assert answer.choices[0].finish_reason == "stop"
    assert_is_a_pet(answer.choices[0].message.content)
    assert latest_generation().params["grammar"].startswith("animal ::=")


def test_a_streamed_json_schema_answer_parses_and_matches_the_schema(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK_PET,
            response_format=PET_FORMAT,
            max_tokens=200,
            seed=6,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert text == latest_generation().text
    assert_is_a_pet(text)


def test_a_json_object_answer_parses_as_an_object(client):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with a city and its country."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        seed=2,
    )
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_a_schema_keyword_the_grammar_cannot_enforce_is_refused_by_name(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        )
    assert caught.value.body["param"] == "response_format"
    assert caught.value.body["type"] == "invalid_request_error"
    assert "schema.properties.n: multipleOf is not supported" in caught.value.body["message"]
    assert not Generation.objects.exists()


# --- tool calls (the test model's ChatML template has none: the text fallback) -------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
# temperature 0: the same call every run; the grammar keeps it well-formed.
CALL_SAMPLING = {"max_tokens": 40, "temperature": 0, "seed": 1}


def rendered_prompt(gen: Generation) -> str:
    """The prompt the worker built for gen, rendered again as text."""
    return tokenizer_for(gen.model.path).render(
        gen.input_messages,
        tools=tool_calls.tool_defs(gen.params),
    )


def test_a_required_tool_call_then_its_result_turn(client):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER, ADD],
        tool_choice="required",
        **CALL_SAMPLING,
    )
    gen = latest_generation()
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert (call.id, call.type) == (f"call_{gen.pk}_0", "function")
    arguments = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(arguments) == {"city"} and len(arguments["city"]) <= 12
    else:
        assert call.function.name == "add" and type(arguments["a"]) is int
    # The raw answer is stored; the tools were shown in the system prompt.
    assert gen.text.startswith("<tool_call>") and gen.text.endswith("</tool_call>")
    assert '"name": "get_weather"' in rendered_prompt(gen)

    # The call's result goes back as a tool message; tool_choice "none" hides the
    # tools, and the answer is text.
    result = {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[*ASK_WEATHER, choice.message, result],
        tools=[WEATHER],
        tool_choice="none",
        **{**CALL_SAMPLING, "max_tokens": 8},
    )
    gen = latest_generation()
    assert answer.choices[0].message.content == gen.text != ""
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in {"stop", "length"}
    assert "tools" not in gen.params and "grammar" not in gen.params
    prompt = rendered_prompt(gen)
    assert "You can call" not in prompt
    assert (
        f"<tool_call>{json.dumps({'name': call.function.name, 'arguments': arguments})}" in prompt
    )
    assert '"result": "Sunny, 21 C"' in prompt
    assert answer.usage.prompt_tokens == gen.metrics.prompt_tokens


def test_a_streamed_call_of_a_named_function_then_its_result_turn(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK_WEATHER,
            tools=[ADD, WEATHER],
            tool_choice=named,
            stream=True,
            **CALL_SAMPLING,
        )
    )
    gen = latest_generation()
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)
    pieces = [piece for d in deltas for piece in d.tool_calls or ()]
    first = pieces[0]
    assert (first.index, first.id, first.type) == (0, f"call_{gen.pk}_0", "function")
    assert first.function.name == "get_weather"
    assert {piece.index for piece in pieces} == {0}
    arguments = "".join(piece.function.arguments or "" for piece in pieces)
    assert set(json.loads(arguments)) == {"city"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage.completion_tokens == gen.metrics.completion_tokens

    # The result turn, streamed, tool_choice "auto" (the default with tools): the
    # model may call again or answer; it answers, from the result.
    call = {
        "id": first.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[
                *ASK_WEATHER,
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": first.id, "content": "Sunny, 21 C"},
            ],
            tools=[ADD, WEATHER],  # as before: the cached prompt is reused
            stream=True,
            **{**CALL_SAMPLING, "max_tokens": 10},
        )
    )
    gen = latest_generation()
    assert gen.params["tool_choice"] == "auto"
    assert '"result": "Sunny, 21 C"' in rendered_prompt(gen)
    assert gen.metrics.cached_tokens > 150
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert text == gen.text and "sunny" in text.lower()


# --- fields: honoured, refused by name, or knowingly ignored ---------------------------


def test_documented_ignored_fields_are_accepted(client):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{**HELLO[0], "name": "alice"}],  # agent frameworks name participants
        max_tokens=4,
        temperature=0,  # sampled, two tokens were once both whitespace or the end
        user="u-42",
        store=False,
        metadata={"job": "nightly"},
        tool_choice="none",
    )
    assert answer.choices[0].message.content == latest_generation().text != ""


# --- errors ---------------------------------------------------------------------------


def test_a_missing_key_is_refused_with_401(stack, default_model):
    # The openai client will not send a request without a key; a script might.
    status, error = post_raw(stack, "/v1/chat/completions", None, json.dumps({"model": MODEL}))
    assert status == 401
    assert error["error"]["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in error["error"]["message"]


def test_a_wrong_key_is_refused_with_401(stack, alice_key):
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(stack, alice_key.secret + "x").chat.completions.create(
            model=MODEL, messages=HELLO
        )
    assert caught.value.status_code == 401
    assert not Generation.objects.exists()


def test_a_revoked_key_is_refused_with_401(client, alice_key):
    assert client.models.list().data
    alice_key.revoke()
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert "revoked" in caught.value.body["message"]
    assert not Generation.objects.exists()


def test_an_expired_key_is_refused_with_401_saying_when_it_expired(stack, cast, default_model):
    key, secret = ApiKey.issue(
        user=cast.alice, name="temp", expires_at=timezone.now() - timedelta(minutes=1)
    )
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(stack, secret).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"
    assert f"This API key expired on {key.expires_at_display}." in caught.value.body["message"]
    assert not Generation.objects.exists()
    key.refresh_from_db()
    assert key.last_used_at is None, "a refused call is not a use"


def test_a_key_over_its_own_limit_gets_429_with_retry_after(stack, cast, default_model):
    # Alice herself has no limit; her other keys are not counted (tests/test_quotas.py).
    capped, secret = ApiKey.issue(user=cast.alice, name="capped", tokens_per_day=50)
    Generation.objects.create(
        user=capped.user,
        model=default_model,
        source=Generation.SOURCE_API,
        api_key_name="capped",
        state=Generation.DONE,
        prompt_tokens=40,
        completion_tokens=10,
    )
    with pytest.raises(openai.RateLimitError) as caught:
        client_for(stack, secret).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    assert caught.value.status_code == 429
    assert caught.value.body["code"] == "rate_limit_exceeded"
    assert "This API key's limit is 50 tokens per day" in caught.value.body["message"]
    # Retry-After: whole seconds until the day's tokens reset at midnight.
    to_midnight = start_of_day(timezone.now()) + timedelta(days=1) - timezone.now()
    retry_after = int(caught.value.response.headers["Retry-After"])
    assert abs(retry_after - to_midnight.total_seconds()) <= 5
    assert Generation.objects.count() == 1


def test_an_unknown_model_is_refused_with_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=HELLO)
    assert caught.value.status_code == 404
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"
    assert "gpt-17" in caught.value.body["message"]


def test_a_prompt_longer_than_the_context_is_refused_with_400_and_both_counts(
    client, default_model
):
    long_prompt = "The sea is blue. " * 2500  # well over the 8,192-token context
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long_prompt}]
        )
    error = caught.value.body
    assert caught.value.status_code == 400 and error["code"] == "context_length_exceeded"
    assert f"maximum context length is {default_model.n_ctx} tokens" in error["message"]
    prompt_tokens = int(error["message"].split(" in the messages")[0].split("(")[-1])
    assert prompt_tokens > default_model.n_ctx
    assert not Generation.objects.exists(), "an overflow must be refused before it is queued"


def test_max_tokens_beyond_the_context_is_refused_with_400_and_both_counts(client, default_model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="Hello there", max_tokens=default_model.n_ctx)
    message = caught.value.body["message"]
    assert caught.value.body["code"] == "context_length_exceeded"
    assert f"requested {default_model.n_ctx + 2} tokens (2 in the prompt, " in message
    assert f"{default_model.n_ctx} in the completion" in message


def test_a_rate_limited_key_gets_429_with_retry_after(client, alice_key):
    Quota.objects.create(user=alice_key.user, requests_per_minute=1)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert caught.value.status_code == 429
    retry_after = int(caught.value.response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert "1 generation(s) per minute" in caught.value.body["message"]
    assert Generation.objects.count() == 1


def test_a_model_no_worker_serves_is_refused_with_503(client, default_model):
    LanguageModel.objects.create(name="orphan", path=default_model.path, enabled=True)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="orphan", messages=HELLO, max_tokens=2)
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "no_worker"
    assert not Generation.objects.filter(model__name="orphan").exists()


INVALID_BODIES = [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": HELLO}, "model"),
    ({"model": MODEL, "messages": HELLO, "temperature": 5}, "temperature"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": HELLO, "n": 3}, "n"),
    ({"model": MODEL, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "messages": HELLO, "stream": "yes"}, "stream"),
    ({"model": MODEL, "messages": HELLO, "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": MODEL, "messages": HELLO, "logprobs": True}, "logprobs"),
    ({"model": MODEL, "messages": HELLO, "functions": [{"name": "f"}]}, "functions"),
    ({"model": MODEL, "messages": HELLO, "tool_choice": "auto"}, "tool_choice"),
    ({"model": MODEL, "messages": HELLO, "top_k": 40}, "top_k"),
    ({"model": MODEL, "messages": HELLO, "response_format": {"type": "yaml"}}, "response_format"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "1"}]}, "messages[0].tool_call_id"),
    ({"model": MODEL, "messages": HELLO, "function_call": "auto"}, "function_call"),
    ({"model": MODEL, "messages": HELLO, "tools": WEATHER}, "tools"),
    ({"model": MODEL, "messages": HELLO, "tools": [{"type": "custom"}]}, "tools[0]"),
    (
        {"model": MODEL, "messages": HELLO, "tools": [{**ADD, "function": {"name": "a b"}}]},
        "tools[0].function.name",
    ),
    (
        {
            "model": MODEL,
            "messages": HELLO,
            "tools": [{**ADD, "function": {"name": "f", "parameters": {"type": "string"}}}],
        },
        "tools[0].function.parameters",
    ),
    (
        {
            "model": MODEL,
            "messages": HELLO,
            "tools": [
                ADD,
                {
                    **ADD,
                    "function": {
                        "name": "n",
                        "parameters": {"properties": {"n": {"type": "integer", "multipleOf": 3}}},
                    },
                },
            ],
        },
        "tools[1].function.parameters",
    ),
    (
        {"model": MODEL, "messages": HELLO, "tools": [ADD], "tool_choice": {"type": "function"}},
        "tool_choice",
    ),
    (
        {
            "model": MODEL,
            "messages": HELLO,
            "tools": [ADD],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
        "tool_choice",
    ),
    (
        {"model": MODEL, "messages": HELLO, "tools": [ADD], "parallel_tool_calls": 1},
        "parallel_tool_calls",
    ),
    (
        {
            "model": MODEL,
            "messages": HELLO,
            "tools": [ADD],
            "response_format": {"type": "json_object"},
        },
        "response_format",
    ),
    (
        {
            "model": MODEL,
            "messages": [*HELLO, {"role": "tool", "tool_call_id": "call_9", "content": "1"}],
        },
        "messages[1].tool_call_id",
    ),
    (
        {
            "model": MODEL,
            "messages": [
                *HELLO,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "add", "arguments": "1"},
                        }
                    ],
                },
            ],
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
]


def test_invalid_fields_are_refused_with_400_naming_each_field(stack, alice_key):
    # One test for the table (each live-stack test costs a database flush).
    for body, param in INVALID_BODIES:
        status, error = post_raw(stack, "/v1/chat/completions", alice_key.secret, json.dumps(body))
        assert (status, error["error"]["param"]) == (400, param), body
        assert error["error"]["type"] == "invalid_request_error"
    # Tools are a chat's: the completions endpoint refuses them.
    body = json.dumps({"model": MODEL, "prompt": "Hi", "tools": [WEATHER]})
    status, error = post_raw(stack, "/v1/completions", alice_key.secret, body)
    assert (status, error["error"]["param"]) == (400, "tools")
    assert not Generation.objects.exists()


def test_a_body_that_is_not_json_is_refused_with_400(stack, alice_key):
    status, error = post_raw(stack, "/v1/completions", alice_key.secret, "{not json")
    assert status == 400 and "not valid JSON" in error["error"]["message"]


def post_raw(stack, path: str, secret: str | None, data: str) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    request = urllib.request.Request(stack.http_url + path, data=data.encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_wrong_method_is_refused_with_405_in_openais_shape(stack, alice_key):
    request = urllib.request.Request(
        stack.http_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {alice_key.secret}"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 405
    assert json.loads(caught.value.read())["error"]["code"] == "method_not_allowed"
