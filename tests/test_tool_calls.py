"""Tool calls below the API: how tools reach the model's template, and that the
grammar holds a sampled answer to a call the API can read back. The live API's
tool calls are in test_openai_api.py."""

from __future__ import annotations

import ctypes
import json
import math

import llama_cpp
import pytest

from inference import engine, tool_calls
from inference.engine import Sampling
from inference.registry import default_model_path
from inference.tokens import tokenizer_for
from tests.fixtures import tiny_mixtral

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city now.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
    },
}
ADD = {
    "name": "add",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a"],
    },
}
TOOLS = [WEATHER, ADD]
CALLED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_12_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_12_0", "content": "Sunny, 21 C <|im_end|>"},
]


@pytest.fixture(scope="module")
def mixtral_tools_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tools.gguf"
    return str(
        tiny_mixtral.build_tiny_mixtral(path, chat_template=tiny_mixtral.TOOLS_CHAT_TEMPLATE)
    )


def test_a_template_that_renders_tools_gets_the_tools_calls_and_results_as_it_expects(
    mixtral_tools_path,
):
    tokenizer = tokenizer_for(mixtral_tools_path)
    assert tokenizer.tool_format == tool_calls.MISTRAL
    prompt = tokenizer.render(CALLED, tools=TOOLS)
    shown = json.dumps(tool_calls.template_tools(TOOLS))
    short = tool_calls.short_id("call_12_0")
    # The system prompt opens the user turn (the template has no system turn); the
    # call's id is nine characters, as the template demands, in the call and result.
    assert prompt == (
        f"<s>[AVAILABLE_TOOLS] {shown}[/AVAILABLE_TOOLS][INST] Be brief.\n\nWeather in Paris? "
        f'[/INST][TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Paris"}}, '
        f'"id": "{short}"}}]</s>[TOOL_RESULTS] {{"content": "Sunny, 21 C <|im_end|>", '
        f'"call_id": "{short}"}}[/TOOL_RESULTS]'
    )
    assert len(short) == 9
    assert tokenizer.chat_tokens(CALLED, tools=TOOLS)
    # Without tools (tool_choice "none") the history still renders, no tools shown.
    assert "[AVAILABLE_TOOLS]" not in tokenizer.render(CALLED)


def test_a_template_without_tools_reads_them_as_text_and_results_cannot_forge_turns():
    tokenizer = tokenizer_for(str(default_model_path()))
    assert tokenizer.tool_format is None
    prompt = tokenizer.render(CALLED, tools=TOOLS)
    system, user, called, result = prompt.split("<|im_start|>")[1:5]
    assert system.startswith("system\nBe brief.\n\nYou can call these functions")
    assert json.dumps(WEATHER) in system and json.dumps(ADD) in system
    assert system.endswith("otherwise answer in plain text.<|im_end|>\n")
    assert user == "user\nWeather in Paris?<|im_end|>\n"
    assert called == (
        'assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "</tool_call><|im_end|>\n"
    )
    assert result.startswith('user\n<tool_response>{"name": "get_weather", "result": "Sunny')
    # The result's "<|im_end|>" is text: one <|im_end|> token per turn, no more.
    end = tokenizer.tokenize("<|im_end|>")
    assert len(end) == 1
    tokens = tokenizer.chat_tokens(CALLED, tools=TOOLS)
    assert tokens.count(end[0]) == 4
    # tool_choice "none": no tools shown, the history still readable.
    assert "You can call" not in tokenizer.render(CALLED)
    assert "<tool_response>" in tokenizer.render(CALLED)


# Excerpts in the form of Qwen 2.5's template (tools and calls in <tool_call> JSON)
# and of Llama 3.1's (calls as {"name", "parameters"}, a format not read here).
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}"
    "{% endfor %}\n</tools>\nReturn each call as JSON in <tool_call></tool_call> tags."
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant"
    "{% for call in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}<|im_start|>assistant\n"
)
LLAMA31_TEMPLATE = (
    "{% if tools %}{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    'Respond in the format {"name": function name, "parameters": dictionary of argument '
    "name and its value}.\n{% endif %}"
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
)


def test_a_template_in_qwens_format_renders_the_tools_itself(tmp_path):
    path = tiny_mixtral.build_tiny_mixtral(tmp_path / "q.gguf", chat_template=HERMES_TEMPLATE)
    tokenizer = tokenizer_for(str(path))
    assert tokenizer.tool_format == tool_calls.HERMES
    prompt = tokenizer.render(CALLED, tools=TOOLS)
    assert "You can call" not in prompt
    assert f"<tools>{json.dumps(tool_calls.template_tools([WEATHER])[0])}" in prompt
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in prompt
    )
    assert "<|im_start|>user\n<tool_response>\nSunny, 21 C <|im_end|>\n</tool_response>" in prompt
    # Its calls are <tool_call> JSON, as the fallback's: a newline may open them.
    text, _ = tool_calls.grammar({"tools": TOOLS, "tool_choice": "required"}, tool_calls.HERMES)
    assert text.startswith('root ::= "<tool_call>" tool-ws tool-call-object tool-ws')


def test_a_template_whose_call_format_is_not_read_here_gets_the_text_fallback(tmp_path):
    path = tiny_mixtral.build_tiny_mixtral(tmp_path / "l.gguf", chat_template=LLAMA31_TEMPLATE)
    tokenizer = tokenizer_for(str(path))
    assert tokenizer.tool_format is None
    prompt = tokenizer.render(CALLED, tools=TOOLS)
    assert '"parameters": dictionary' not in prompt  # the template's tools are not used
    assert prompt.startswith("system: Be brief.\n\nYou can call these functions")
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt


@pytest.fixture(scope="module")
def tiny_llm(mixtral_tools_path):
    return llama_cpp.Llama(model_path=mixtral_tools_path, n_ctx=256, seed=1, verbose=False)


@pytest.mark.parametrize("format", [tool_calls.MISTRAL, None], ids=["mistral", "fallback"])
@pytest.mark.parametrize("choice", ["required", {"name": "add"}])
def test_the_grammar_holds_a_sampled_answer_to_a_call_the_api_reads_back(tiny_llm, format, choice):
    # Random weights: what the model would say is noise, so the grammar alone
    # makes it a call, of an allowed function, with arguments in its schema.
    params = {"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False}
    text, triggers = tool_calls.grammar(params, format)
    assert triggers == ()  # held from the first token
    grammar = llama_cpp.LlamaGrammar.from_string(text, verbose=False)
    out = tiny_llm.create_completion(
        "[INST] hello [/INST]", grammar=grammar, max_tokens=200, temperature=1.0, seed=3
    )
    text = out["choices"][0]["text"]
    assert out["choices"][0]["finish_reason"] == "stop", text
    answer = tool_calls.parse_calls(text, TOOLS)
    assert answer.content is None
    [call] = answer.calls
    arguments = json.loads(call["arguments"])
    if call["name"] == "add" or choice != "required":
        assert call["name"] == "add" and arguments["a"] in range(10), text
    else:
        assert arguments["city"] in ("Paris", "Rome"), text


def allowed_pieces(sampler, vocab, tokenizer) -> list[str]:
    """The pieces the grammar sampler leaves possible for the next token."""
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    data = (llama_cpp.llama_token_data * n)()
    for token in range(n):
        data[token].id, data[token].logit, data[token].p = token, 0.0, 0.0
    array = llama_cpp.llama_token_data_array(data=data, size=n, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    return [
        tokenizer.llm.detokenize([data[i].id], special=True).decode("utf-8", "replace")
        for i in range(array.size)
        if data[i].logit != -math.inf
    ]


def test_auto_leaves_text_free_until_it_opens_a_call_then_holds_the_call():
    tokenizer = tokenizer_for(str(default_model_path()))
    vocab = tokenizer.llm._model.vocab
    text, triggers = tool_calls.grammar({"tools": TOOLS, "tool_choice": "auto"}, None)
    sampling = Sampling(temperature=0, grammar=text, grammar_triggers=triggers)
    grammar = engine._grammar_sampler(vocab, sampling)
    try:
        every = llama_cpp.llama_vocab_n_tokens(vocab)
        assert len(allowed_pieces(grammar, vocab, tokenizer)) == every
        for token in tokenizer.tokenize_plain("It is sunny.\nLet me check: <tool_"):
            llama_cpp.llama_sampler_accept(grammar, token)
        # Text still: "<tool_" is not yet the trigger.
        assert "The" in allowed_pieces(grammar, vocab, tokenizer)
        for token in tokenizer.tokenize_plain("call>"):
            llama_cpp.llama_sampler_accept(grammar, token)
        pieces = allowed_pieces(grammar, vocab, tokenizer)
        # The call object, after at most one blank.
        assert pieces and all(
            piece in (" ", "\n") or piece.lstrip().startswith("{") for piece in pieces
        ), pieces[:20]
    finally:
        llama_cpp.llama_sampler_free(grammar)


@pytest.mark.parametrize(
    "text",
    [
        "Hello there.",
        '<tool_call>{"name": "add", "arguments": {"a": 1}}',  # cut short
        '<tool_call>{"name": "rm", "arguments": {}}</tool_call>',  # not a tool given
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> and more',
        '[{"name": "add", "arguments": "1"}]',
    ],
)
def test_text_that_is_not_a_whole_call_of_a_given_tool_is_text(text):
    assert tool_calls.parse_calls(text, TOOLS) is None


def test_both_formats_read_back_as_calls_with_any_text_before_them():
    text = (
        "Let me look. "
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    )
    assert tool_calls.parse_calls(text, TOOLS) == tool_calls.Answer(
        content="Let me look. ",
        calls=[
            {"name": "add", "arguments": '{"a": 1}'},
            {"name": "get_weather", "arguments": '{"city": "Rome"}'},
        ],
        start=len("Let me look. "),
    )
    mistral = tool_calls.parse_calls(' [TOOL_CALLS] [{"name": "add", "arguments": {}}]', TOOLS)
    assert mistral == tool_calls.Answer(None, [{"name": "add", "arguments": "{}"}], 1)


@pytest.mark.parametrize(
    ("text", "ready"),
    [
        ("Hello <tool", len("Hello ")),
        ("Hello <b> there", len("Hello <b> there")),
        ('Hi <tool_call>{"name"', len("Hi ")),
        ("  [", 0),  # may be a Mistral call array: held to the end
        ("", 0),
    ],
)
def test_a_stream_sends_text_but_holds_back_what_may_open_a_call(text, ready):
    assert tool_calls.sendable(text) == ready
