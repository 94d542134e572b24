"""Counting a prompt's tokens exactly as the worker will, in any process.

The worker renders messages through the GGUF file's own chat template and tokenizes
with its own vocabulary (ChatTokenizer over the loaded model). The web process does
the same with a vocabulary-only llama.cpp handle, which reads the tokenizer from the
file but no weights (milliseconds, a few MB even for Mixtral), so a prompt that does
not fit the context is refused with its size before it is queued.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from functools import lru_cache

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter


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

    def render(self, messages: Sequence[dict], assistant_prefix: str = "") -> str:
        """The prompt text; assistant_prefix continues an answer cut short (a retry)."""
        return self.formatter(messages=list(messages)).prompt + assistant_prefix

    def tokenize(self, text: str) -> list[int]:
        # The chat template writes the BOS token itself where the model wants one.
        with self._lock:
            return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def chat_tokens(self, messages: Sequence[dict], assistant_prefix: str = "") -> list[int]:
        return self.tokenize(self.render(messages, assistant_prefix))


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


def count_chat_tokens(model, messages: Sequence[dict]) -> int:
    """The prompt tokens of `messages` for `model` (a LanguageModel, or anything with
    a `path`), identical to the count the worker gets."""
    return len(tokenizer_for(model.path).chat_tokens(messages))


def count_text_tokens(model, text: str) -> int:
    """The tokens of a raw prompt (no chat template), as the worker counts them."""
    return len(tokenizer_for(model.path).tokenize(text))
