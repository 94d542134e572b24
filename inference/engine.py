"""The model, through llama.cpp. Knows nothing of Django, requests or sockets.

One Engine per worker process, created inside that process, used by one thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

GGML_CACHE_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}


class ContextOverflow(ValueError):
    """The prompt plus the requested tokens do not fit the context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx
        super().__init__(
            f"The prompt is {prompt_tokens} tokens and the context holds {n_ctx}"
            + (f" (with {max_tokens} new tokens requested)" if max_tokens else "")
            + "."
        )


class Cancelled(Exception):
    """The caller asked to stop during prompt evaluation."""


@dataclass(frozen=True)
class LoadOptions:
    path: str
    n_ctx: int = 8192
    n_gpu_layers: int = 0
    flash_attn: bool = False
    type_k: str = "f16"
    type_v: str = "f16"
    n_threads: int = 0
    n_batch: int = 512


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class RunStats:
    """What one run cost, filled in while it streams. Times are time.monotonic()."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    started: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_reason: str = ""

    @property
    def prompt_eval_s(self) -> float | None:
        if self.first_token is None:
            return None
        return self.first_token - self.started

    @property
    def decode_s(self) -> float | None:
        if self.first_token is None or self.finished is None:
            return None
        return self.finished - self.first_token

    @property
    def decode_tokens_per_s(self) -> float | None:
        # The first token comes out of prompt evaluation; decode speed is measured
        # over the tokens after it.
        decode_s = self.decode_s
        if not decode_s or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / decode_s

    @property
    def prompt_tokens_per_s(self) -> float | None:
        evaluated = self.prompt_tokens - self.cached_tokens
        if not self.prompt_eval_s or evaluated <= 0:
            return None
        return evaluated / self.prompt_eval_s

    def inter_token_ms(self) -> list[float]:
        times = self.token_times
        return [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]


class Engine:
    """A loaded GGUF model with one context, kept between requests for prefix reuse."""

    def __init__(self, options: LoadOptions):
        self.options = options
        # The cancel flag of the run in progress; llama.cpp polls it between graph
        # computations, so a stop ends a long prompt evaluation within one batch.
        self._cancel = threading.Event()
        self.llm = llama_cpp.Llama(
            model_path=options.path,
            n_ctx=options.n_ctx,
            n_gpu_layers=options.n_gpu_layers,
            flash_attn=options.flash_attn,
            type_k=GGML_CACHE_TYPES[options.type_k],
            type_v=GGML_CACHE_TYPES[options.type_v],
            n_threads=options.n_threads or None,
            n_batch=options.n_batch,
            verbose=False,
        )
        self._abort_callback = llama_cpp.ggml_abort_callback(lambda _data: self._cancel.is_set())
        llama_cpp.llama_set_abort_callback(self.llm._ctx.ctx, self._abort_callback, None)
        self.formatter = self._chat_formatter()

    # --- what the file says ---------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    @property
    def metadata(self) -> dict[str, str]:
        return self.llm.metadata

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{self.options.path} has no chat template (tokenizer.chat_template)")
        model = self.llm._model
        eos, bos = model.token_eos(), model.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )

    # --- prompts --------------------------------------------------------------
    def chat_prompt_tokens(self, messages: Sequence[dict], assistant_prefix: str = "") -> list[int]:
        """The token ids of messages rendered through the file's chat template.

        assistant_prefix continues an answer that was cut short (a retried run).
        """
        prompt = self.formatter(messages=list(messages)).prompt + assistant_prefix
        return self.tokenize(prompt)

    def tokenize(self, text: str) -> list[int]:
        # The chat template writes the BOS token itself where the model wants one.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.n_ctx:
            raise ContextOverflow(prompt_tokens, max_tokens, self.n_ctx)

    # --- generation -----------------------------------------------------------
    def stream(
        self,
        prompt_tokens: list[int],
        sampling: Sampling,
        cancel: threading.Event,
        stats: RunStats,
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece (about a token each).

        Stops at end of generation, max_tokens, a stop string, or when `cancel` is
        set (checked each token). Raises Cancelled if it is set while the prompt is
        still being evaluated.
        """
        llm = self.llm
        max_tokens = min(sampling.max_tokens, self.n_ctx - len(prompt_tokens))
        self.check_fits(len(prompt_tokens), 1)
        stats.prompt_tokens = len(prompt_tokens)
        stats.cached_tokens = self._reusable_prefix(prompt_tokens)
        stats.started = time.monotonic()
        if sampling.seed is not None:
            llm.set_seed(sampling.seed)

        vocab = llm._model.vocab
        pending = b""  # bytes of a UTF-8 character not yet complete
        held = ""  # text that may be the start of a stop string
        generated: list[int] = []
        self._cancel = cancel
        tokens = llm.generate(
            prompt_tokens,
            temp=sampling.temperature,
            top_p=sampling.top_p,
            reset=True,
        )
        try:
            while True:
                try:
                    token = next(tokens)
                except StopIteration:
                    stats.finish_reason = stats.finish_reason or "stop"
                    break
                except RuntimeError as exc:
                    if not cancel.is_set():
                        raise
                    if stats.first_token is None:
                        raise Cancelled() from exc
                    stats.finish_reason = "cancelled"
                    break
                now = time.monotonic()
                if stats.first_token is None:
                    stats.first_token = now
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    stats.finish_reason = "stop"
                    break
                stats.token_times.append(now)
                stats.completion_tokens += 1
                piece = pending + llm.detokenize([token], prev_tokens=prompt_tokens + generated)
                generated.append(token)
                text, pending = _decode_complete_utf8(piece)
                held += text
                emit, held, hit_stop = _split_on_stop(held, sampling.stop)
                if emit:
                    yield emit
                if hit_stop:
                    stats.finish_reason = "stop"
                    break
                if stats.completion_tokens >= max_tokens:
                    stats.finish_reason = "length"
                    break
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
            if stats.finish_reason != "cancelled" and held:
                yield held
        finally:
            tokens.close()
            stats.finished = time.monotonic()

    def _reusable_prefix(self, prompt_tokens: list[int]) -> int:
        llm = self.llm
        if llm.n_tokens == 0:
            return 0
        cached = llm._input_ids
        n = 0
        for a, b in zip(cached, prompt_tokens, strict=False):
            if a != b:
                break
            n += 1
        # llama-cpp-python re-evaluates the last prompt token to refresh logits.
        return max(0, min(n, len(prompt_tokens) - 1))


def _decode_complete_utf8(data: bytes) -> tuple[str, bytes]:
    """Decode what forms whole characters; return the incomplete tail separately."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace"), b""


def _split_on_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split text into (safe to emit, held back, stop string reached)."""
    if not stops:
        return text, "", False
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            return text[:index], "", True
    # Hold back the longest tail that could still grow into a stop string.
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-length:]):
                hold = max(hold, length)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False
