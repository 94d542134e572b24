"""Counting a prompt's tokens exactly as the worker will, in any process.

The worker renders messages through the GGUF file's own chat template and tokenizes
with its own vocabulary (ChatTokenizer over the loaded model). The web process does
the same with a vocabulary-only llama.cpp handle, which reads the tokenizer from the
file but no weights (milliseconds, a few MB even for Mixtral), so a prompt that does
not fit the context is refused with its size before it is queued.

Only the template writes control tokens. A message's text is plain text: a user who
types `<|im_end|>` or `</s>`, or a document that contains one, gets those characters
read as characters, never a turn forged. The template is rendered with a marker
around each message's text; control tokens are looked for in the template's parts
only, as llama.cpp would look for them in the whole prompt, and the text between
them (template and messages together, so that tokens merge across the seams as
before) is tokenized as plain text. A prompt without control-token text in its
messages therefore has exactly the tokens it had when the whole prompt was parsed.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Sequence
from functools import lru_cache

import jinja2
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from . import tool_calls

# What llama.cpp parses as a token in text only when asked to parse special tokens
# (user-defined tokens it parses either way, so they need no care here).
CONTROL_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN

# How a chat template refuses messages: raise_exception() raises ValueError, and a
# template can fail on what it did not expect (a missing key, a wrong type).
TEMPLATE_ERRORS = (ValueError, TypeError, jinja2.TemplateError)


class ChatTemplateError(ValueError):
    """The model's chat template refuses these messages; the message says why."""


class ChatTokenizer:
    """Renders chat messages with the model's template and tokenizes them."""

    def __init__(self, llm: llama_cpp.Llama, path: str = ""):
        self.llm = llm
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(
                f"{path or 'the model'} has no chat template (tokenizer.chat_template)"
            )
        model = llm._model
        eos, bos = model.token_eos(), model.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )
        self._lock = threading.Lock()
        # BPE and SentencePiece cut text into tokens of at least one byte each;
        # WPM and UGM normalize the text first, which can lengthen it.
        self.bytes_bound_tokens = llama_cpp.llama_vocab_type(model.vocab) in (
            llama_cpp.LLAMA_VOCAB_TYPE_BPE,
            llama_cpp.LLAMA_VOCAB_TYPE_SPM,
        )
        self.control_tokens = _control_tokens(model.vocab)
        self.tool_format = self._tool_format()

    def _tool_format(self) -> str | None:
        """The call format of a template that shows the model the tools it is given
        (Mistral v3's, Qwen's; ChatML's ignores them): then tools, calls and results
        go to it as they are. None: the text fallback (tool_calls.py)."""
        probe = tool_calls.template_tools([{"name": "probe_tool_x7", "parameters": {}}])
        try:
            prompt = self.formatter(messages=[{"role": "user", "content": "hi"}], tools=probe)
        except TEMPLATE_ERRORS:
            return None
        if "probe_tool_x7" not in prompt.prompt:
            return None
        return tool_calls.call_format(prompt.prompt)

    def render(
        self,
        messages: Sequence[dict],
        assistant_prefix: str = "",
        tools: Sequence[dict] = (),
    ) -> str:
        """The prompt text; assistant_prefix continues an answer cut short (a retry).
        tools: the functions shown to the model (tool_calls.tool_defs)."""
        messages, shown = self.template_messages(messages, tools)
        return self._format(messages, shown) + assistant_prefix

    def template_messages(
        self, messages: Sequence[dict], tools: Sequence[dict] = ()
    ) -> tuple[list[dict], list[dict] | None]:
        """The messages as the template takes them, and the tools it is given (None:
        none, or the template has no place for them and they are in the messages).
        Consecutive turns of one role become one (an answer stopped before its first
        word leaves two user turns in a row), and where the template refuses a
        system turn (Mistral's, Mixtral's), the system prompt opens the first user
        turn: a conversation can always continue. ChatTemplateError if the template
        still refuses."""
        shown = None
        if self.tool_format:
            messages = tool_calls.native_messages(messages)
            shown = tool_calls.template_tools(tools) or None
        elif tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
            messages = tool_calls.fallback_messages(messages, tools)
        merged = _merged(messages)
        candidates = [merged]
        if any(message.get("role") == "system" for message in merged):
            candidates.append(_system_folded(merged))
        for candidate in candidates:
            try:
                self.formatter(messages=candidate, tools=shown)
            except TEMPLATE_ERRORS as exc:
                error = exc
                continue
            return candidate, shown
        raise ChatTemplateError(f"The model's chat template refuses this conversation: {error}")

    def _format(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        try:
            return self.formatter(messages=messages, tools=tools).prompt
        except TEMPLATE_ERRORS as exc:
            raise ChatTemplateError(
                f"The model's chat template refuses this conversation: {exc}"
            ) from None

    def tokenize(self, text: str) -> list[int]:
        """A raw prompt's tokens (the completions API): its author writes the whole
        prompt, control tokens included, as with llama.cpp's server."""
        # The chat template writes the BOS token itself where the model wants one.
        with self._lock:
            return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def tokenize_plain(self, text: str) -> list[int]:
        """Tokens of text that is read as text only: no control token comes out."""
        if not text:
            return []
        with self._lock:
            return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def chat_tokens(
        self,
        messages: Sequence[dict],
        assistant_prefix: str = "",
        tools: Sequence[dict] = (),
    ) -> list[int]:
        """The prompt's tokens: control tokens from the template only. tools: the
        functions shown to the model (tool_calls.tool_defs)."""
        tokens = []
        for fragment in self._fragments(messages, assistant_prefix, tools):
            if isinstance(fragment, int):
                tokens.append(fragment)
            else:
                tokens += self.tokenize_plain(fragment)
        return tokens

    def _fragments(self, messages: Sequence[dict], assistant_prefix: str, tools) -> list[int | str]:
        """The prompt as control token ids and the plain text between them. A native
        template writes the tools and the calls itself: their text is the API
        caller's, who may write control tokens in a raw prompt anyway."""
        messages, shown = self.template_messages(messages, tools)
        marker = f"\ue000{secrets.token_hex(8)}\ue001"
        marked = [
            {**message, "content": f"{marker}{message['content']}{marker}"}
            if isinstance(message.get("content"), str)
            else message
            for message in messages
        ]
        parts = self._format(marked, shown).split(marker)
        if len(parts) % 2 == 0:
            raise ChatTemplateError("The model's chat template cuts a message's text apart.")
        contents = parts[1::2]
        plain = self._format(messages, shown)
        if (
            "".join(parts) != plain
            and "".join(part.strip() if index % 2 else part for index, part in enumerate(parts))
            == plain
        ):
            contents = [content.strip() for content in contents]  # the template trims
        fragments: list[int | str] = []
        for template_part, content in zip(parts[::2], [*contents, assistant_prefix], strict=True):
            fragments += self._partition(template_part)
            fragments.append(content)
        # Neighbouring texts are one text, as they were in the whole prompt.
        merged: list[int | str] = []
        for fragment in fragments:
            if isinstance(fragment, str) and merged and isinstance(merged[-1], str):
                merged[-1] += fragment
            elif fragment != "":
                merged.append(fragment)
        return merged

    def _partition(self, text: str) -> list[int | str]:
        """Template text cut at the control tokens it writes, as llama.cpp cuts a
        prompt (longest token text first; a token marked lstrip or rstrip takes the
        whitespace beside it)."""
        fragments: list[int | str] = [text]
        for token_id, token_text, lstrip, rstrip in self.control_tokens:
            cut: list[int | str] = []
            for fragment in fragments:
                if isinstance(fragment, int) or token_text not in fragment:
                    cut.append(fragment)
                    continue
                pieces = fragment.split(token_text)
                for index, piece in enumerate(pieces):
                    if index > 0 and rstrip:
                        piece = piece.lstrip()
                    if index < len(pieces) - 1 and lstrip:
                        piece = piece.rstrip()
                    if piece:
                        cut.append(piece)
                    if index < len(pieces) - 1:
                        cut.append(token_id)
            fragments = cut
        return fragments


def _merged(messages: Sequence[dict]) -> list[dict]:
    """Consecutive turns of one role as one turn, their texts a blank line apart."""
    merged: list[dict] = []
    for message in messages:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and previous.get("role") == message.get("role")
            and isinstance(previous.get("content"), str)
            and isinstance(message.get("content"), str)
        ):
            merged[-1] = {**previous, "content": f"{previous['content']}\n\n{message['content']}"}
        else:
            merged.append(dict(message))
    return merged


def _system_folded(messages: list[dict]) -> list[dict]:
    """The system turns' text at the start of the first user turn (a user turn of
    its own if there is none)."""
    system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
    rest = [m for m in messages if m.get("role") != "system"]
    for index, message in enumerate(rest):
        if message.get("role") == "user":
            rest[index] = {**message, "content": f"{system}\n\n{message['content']}"}
            return rest
    return [{"role": "user", "content": system}, *rest]


def _control_tokens(vocab) -> list[tuple[int, str, bool, bool]]:
    """(id, text, lstrip, rstrip) of the vocabulary's control tokens, longest text
    first, as llama.cpp looks for them."""
    found = []
    for token_id in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token_id)
        if not attr & CONTROL_ATTRS:
            continue
        text = llama_cpp.llama_vocab_get_text(vocab, token_id).decode("utf-8", "replace")
        if text:
            lstrip = bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP)
            rstrip = bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP)
            found.append((token_id, text, lstrip, rstrip))
    found.sort(key=lambda token: -len(token[1].encode("utf-8")))
    return found


@lru_cache(maxsize=8)
def _vocab_tokenizer(path: str, _mtime_ns: int) -> ChatTokenizer:
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, n_ctx=64, verbose=False)
    return ChatTokenizer(llm, path)


def tokenizer_for(path: str) -> ChatTokenizer:
    """A vocabulary-only tokenizer for the file, cached per process (and reloaded if
    the file changes)."""
    return _vocab_tokenizer(str(path), os.stat(path).st_mtime_ns)


# A BPE or SentencePiece token stands for at least one byte of the text it was cut
# from; the margin covers what a tokenizer adds on its own (a leading space, a
# start token).
BOUND_MARGIN_TOKENS = 8


def chat_tokens_bound(model, messages: Sequence[dict]) -> int | None:
    """At least count_chat_tokens(model, messages), without tokenizing: the rendered
    prompt's length in bytes, plus a margin (None for the vocabulary types where
    that does not hold). Rendering takes microseconds where tokenizing takes about
    a millisecond, so a prompt far from the context's end is known to fit at once
    (tests/test_tokens.py checks the bound)."""
    tokenizer = tokenizer_for(model.path)
    if not tokenizer.bytes_bound_tokens:
        return None
    return len(tokenizer.render(messages).encode("utf-8")) + BOUND_MARGIN_TOKENS


def count_chat_tokens(model, messages: Sequence[dict], tools: Sequence[dict] = ()) -> int:
    """The prompt tokens of `messages` for `model` (a LanguageModel, or anything with
    a `path`), identical to the count the worker gets."""
    return len(tokenizer_for(model.path).chat_tokens(messages, tools=tools))


def count_text_tokens(model, text: str) -> int:
    """The tokens of a raw prompt (no chat template), as the worker counts them."""
    return len(tokenizer_for(model.path).tokenize(text))


def count_plain_tokens(model, text: str) -> int:
    """The tokens of text inside a message (a document's part), read as text only."""
    return len(tokenizer_for(model.path).tokenize_plain(text))
