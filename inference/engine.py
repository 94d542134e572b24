"""The model, through llama.cpp. Knows nothing of Django, requests or sockets.

One Engine per worker process, created inside that process, used by one thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import llama_cpp

from .tokens import ChatTokenizer

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
            f"The prompt is {prompt_tokens:,} tokens and the context holds {n_ctx:,}"
            + (f" (with {max_tokens:,} new tokens requested)" if max_tokens > 1 else "")
            + "."
        )


class Cancelled(Exception):
    """The caller asked to stop during prompt evaluation."""


class TimeLimitExceeded(Exception):
    """The run passed its deadline; the text streamed so far stands."""


@dataclass(frozen=True)
class LoadOptions:
    path: str
    n_ctx: int = 8192
    n_gpu_layers: int = 0
    flash_attn: str = "auto"
    type_k: str = "f16"
    type_v: str = "f16"
    n_threads: int = 0
    n_threads_batch: int = 0
    n_batch: int = 512
    n_parallel: int = 1


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


class ModelLoadError(RuntimeError):
    """llama.cpp could not load the model; the message names the file and the cause."""


class DecodeError(RuntimeError):
    """llama.cpp could not evaluate a batch (out of memory, KV cache full...)."""


# What llama_decode's return codes mean (llama.h), in words for the user.
DECODE_ERRORS = {
    1: "out of memory: no room in the KV cache for the batch",
    -1: "invalid input batch",
    -2: "out of memory: could not allocate the compute buffers",
    -3: "the computation failed",
}


class PrefixCache:
    """Saved KV states of earlier conversations, keyed by their tokens: an LRU bounded
    by a memory budget (bytes of host RAM).

    llama-cpp-python's LlamaRAMCache keeps a copy of the logits with every state
    (n_batch x n_vocab floats, 100 MB for SmolLM2) and counts only the KV bytes
    against its budget; this one keeps only sequence 0's KV cells, so the budget is
    what the process really holds.
    """

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._states: OrderedDict[tuple[int, ...], bytes | bytearray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return key in self._states

    @property
    def size_bytes(self) -> int:
        return sum(len(data) + 4 * len(key) for key, data in self._states.items())

    def put(self, tokens: Sequence[int], data: bytes | bytearray) -> None:
        key = tuple(tokens)
        if len(data) > self.capacity_bytes:
            return
        # A state whose tokens are a prefix of the new one is now redundant.
        for old in [k for k in self._states if key[: len(k)] == k]:
            del self._states[old]
        self._states[key] = data
        while self.size_bytes > self.capacity_bytes:
            self._states.popitem(last=False)

    def longest(self, prompt: Sequence[int]) -> tuple[tuple[int, ...] | None, int]:
        """The saved key sharing the longest prefix with `prompt`, and that length."""
        best, best_len = None, 0
        for key in self._states:
            n = common_prefix(key, prompt)
            if n > best_len:
                best, best_len = key, n
        return best, best_len

    def take(self, key: tuple[int, ...]) -> bytes | bytearray:
        self._states.move_to_end(key)
        return self._states[key]


# llama.cpp calls the abort callback after every graph node (about 600 times per
# evaluation of SmolLM2), and each call takes the GIL: while another thread of the
# worker runs Python (the heartbeat, the stop watcher, the resource sampler) the
# model waits for it at every node. A thread busy 15 % of the time slowed a 54-token
# prompt by 19 % and decoding by 13 % with the callback set, and by what it used of
# the CPU without it (docs/benchmarks.md). So it is set only for an evaluation that
# may take longer than this, whose speed is not known yet, or that the deadline may
# fall in; a shorter one is checked before and after, so a stop waits for it (a
# quarter of a second, about, with the margin below).
ABORT_POLL_MIN_S = 0.5
# An evaluation is expected to take up to this many times its last per-token time.
ABORT_POLL_MARGIN = 2.0
_NO_ABORT_CALLBACK = llama_cpp.ggml_abort_callback()  # NULL: llama.cpp skips it


# The live context is saved before a different conversation overwrites it only if
# it would lose at least this many tokens (a follow-up in the same conversation
# loses a few at most, where the answer re-tokenizes differently).
SAVE_MIN_DISCARDED_TOKENS = 32


class Engine:
    """A loaded GGUF model with one context, kept between requests for prefix reuse."""

    def __init__(
        self,
        options: LoadOptions,
        *,
        prefix_cache_bytes: int = 0,
        on_load_progress: Callable[[float], None] | None = None,
    ):
        self.options = options
        # The cancel flag of the run in progress; llama.cpp polls it between graph
        # computations, so a stop ends a long prompt evaluation within one batch.
        self._cancel = threading.Event()
        self._deadline: float | None = None
        try:
            extra_buffers = use_extra_buffers()
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        try:
            with _model_params(on_load_progress, extra_buffers):
                self.llm = llama_cpp.Llama(
                    model_path=options.path,
                    n_ctx=options.n_ctx,
                    n_gpu_layers=options.n_gpu_layers,
                    flash_attn=options.flash_attn == "on",
                    type_k=GGML_CACHE_TYPES[options.type_k],
                    type_v=GGML_CACHE_TYPES[options.type_v],
                    n_threads=options.n_threads or None,
                    n_batch=options.n_batch,
                    verbose=False,
                )
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise ModelLoadError(f"{options.path}: llama.cpp could not load it ({exc})") from exc
        # The deadline is enforced here rather than left to Celery's soft time limit:
        # that arrives as a signal, and a signal that lands while llama.cpp is calling
        # this Python callback is swallowed by ctypes ("Exception ignored").
        self._abort_callback = llama_cpp.ggml_abort_callback(lambda _data: self._should_abort())
        self._polling_aborts: bool | None = None
        # Seconds per token of the last prompt batch and of the last answer's
        # decoding: how long the next evaluation of each kind may take.
        self._batch_s_per_token: float | None = None
        self._decode_s_per_token: float | None = None
        self._poll_aborts(None)
        self.tokenizer = ChatTokenizer(self.llm, options.path)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        # The live context is already in prefix_cache as it stands (save_context).
        self._live_saved = False

    def _should_abort(self) -> bool:
        return self._cancel.is_set() or self._past_deadline()

    def _poll_aborts(self, expected_s: float | None) -> None:
        """Have llama.cpp call the abort callback during the evaluations to come if
        they may take longer than ABORT_POLL_MIN_S (expected_s None: not known) or
        run past the deadline."""
        poll = (
            expected_s is None
            or expected_s > ABORT_POLL_MIN_S
            or (self._deadline is not None and time.monotonic() + expected_s >= self._deadline)
        )
        if poll != self._polling_aborts:
            callback = self._abort_callback if poll else _NO_ABORT_CALLBACK
            llama_cpp.llama_set_abort_callback(self.llm._ctx.ctx, callback, None)
            self._polling_aborts = poll

    @staticmethod
    def _expected_s(tokens: int, s_per_token: float | None) -> float | None:
        return None if s_per_token is None else tokens * s_per_token * ABORT_POLL_MARGIN

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    # --- what the file says ---------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    @property
    def n_batch(self) -> int:
        return self.llm.n_batch

    @property
    def metadata(self) -> dict[str, str]:
        return self.llm.metadata

    # --- prompts --------------------------------------------------------------
    def chat_prompt_tokens(self, messages: Sequence[dict], assistant_prefix: str = "") -> list[int]:
        """The token ids of messages rendered through the file's chat template.

        assistant_prefix continues an answer that was cut short (a retried run).
        """
        return self.tokenizer.chat_tokens(messages, assistant_prefix)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.tokenize(text)

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
        on_prompt_progress: Callable[[int, int], None] | None = None,
        deadline: float | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece (about a token each).

        Stops at end of generation, max_tokens, a stop string, or when `cancel` is
        set (checked each token). Raises Cancelled if it is set while the prompt is
        still being evaluated. A prompt longer than one batch reports its progress
        through on_prompt_progress(evaluated, total) after each batch. Raises
        TimeLimitExceeded once time.monotonic() passes `deadline`, within one token
        (or one graph node during an evaluation that may take longer than
        ABORT_POLL_MIN_S, prompt batches above all).
        """
        llm = self.llm
        self.check_fits(len(prompt_tokens), 1)
        max_tokens = min(sampling.max_tokens, self.n_ctx - len(prompt_tokens))
        stats.prompt_tokens = len(prompt_tokens)
        stats.started = time.monotonic()
        self._cancel = cancel
        self._deadline = deadline
        try:
            stats.cached_tokens = self._prefill(prompt_tokens, cancel, on_prompt_progress)
        except (Cancelled, TimeLimitExceeded) as exc:
            stats.finish_reason = "cancelled" if isinstance(exc, Cancelled) else "time_limit"
            self._cancel, self._deadline = threading.Event(), None
            raise
        if sampling.seed is not None:
            llm.set_seed(sampling.seed)

        # Each decoding step evaluates one token.
        self._poll_aborts(self._expected_s(1, self._decode_s_per_token))
        vocab = llm._model.vocab
        pending = b""  # bytes of a UTF-8 character not yet complete
        held = ""  # text that may be the start of a stop string
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
                    if self._past_deadline():
                        stats.finish_reason = "time_limit"
                        raise TimeLimitExceeded() from exc
                    if not cancel.is_set():
                        raise _decode_error(exc) from exc
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
                # One token's piece: the GGUF tokenizer takes no context (it ignores
                # prev_tokens, which cost a copy of the whole prompt per token).
                piece = pending + llm.detokenize([token])
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
                if self._past_deadline():
                    stats.finish_reason = "time_limit"
                    raise TimeLimitExceeded()
                if deadline is not None:  # it may fall in the next step now
                    self._poll_aborts(self._expected_s(1, self._decode_s_per_token))
            if stats.finish_reason != "cancelled" and held:
                yield held
        finally:
            tokens.close()
            stats.finished = time.monotonic()
            if len(stats.token_times) >= 2:
                decoded_s = stats.token_times[-1] - stats.token_times[0]
                self._decode_s_per_token = decoded_s / (len(stats.token_times) - 1)
            # A stale stop or deadline must not abort the next run.
            self._cancel, self._deadline = threading.Event(), None

    def _prefill(
        self,
        prompt: list[int],
        cancel: threading.Event,
        on_progress: Callable[[int, int], None] | None,
    ) -> int:
        """Evaluate the prompt one batch at a time, starting after the longest
        prefix already in the context (or in a saved state), up to and including its
        last token. Returns the number of tokens reused. generate() then finds the
        whole prompt just evaluated and samples from the last batch's logits at once.
        (Leaving the last token to generate(), as before, cost a second forward pass
        before the first token: one decoding step, 19 ms for SmolLM2 here.)"""
        llm = self.llm
        reused = self._restore_best_prefix(prompt)
        self._live_saved = False  # from here on the context changes
        llm.n_tokens = reused  # llm.eval drops the KV cells from here on
        todo = prompt[reused:]
        report = on_progress if on_progress is not None and len(todo) > self.n_batch else None
        evaluated = reused
        if report:
            report(evaluated, len(prompt))
        for start in range(0, len(todo), self.n_batch):
            if cancel.is_set():
                raise Cancelled()
            if self._past_deadline():
                raise TimeLimitExceeded()
            batch = todo[start : start + self.n_batch]
            self._poll_aborts(self._expected_s(len(batch), self._batch_s_per_token))
            began = time.monotonic()
            try:
                llm.eval(batch)
            except RuntimeError as exc:
                if cancel.is_set():
                    raise Cancelled() from exc
                if self._past_deadline():
                    raise TimeLimitExceeded() from exc
                raise _decode_error(exc) from exc
            self._batch_s_per_token = (time.monotonic() - began) / len(batch)
            evaluated += len(batch)
            if report:
                report(evaluated, len(prompt))
        return reused

    def _restore_best_prefix(self, prompt: list[int]) -> int:
        """Make the context hold the longest available prefix of `prompt`: the live
        one, or a saved state. Saves the live context first when switching away
        would throw much of it away. Returns the prefix length (at most len - 1: the
        last token is always evaluated, to get fresh logits)."""
        llm = self.llm
        live = llm.input_ids[: llm.n_tokens].tolist()
        live_match = common_prefix(live, prompt)
        saved_key, saved_match = self.prefix_cache.longest(prompt)
        discarded = len(live) - max(live_match, 0)
        switching = saved_match > live_match
        if (
            (switching or live_match < len(live))
            and discarded >= SAVE_MIN_DISCARDED_TOKENS
            and not self._live_saved
        ):
            self._save_live(live)
        if switching and self._restore(saved_key):
            live_match = saved_match
        elif switching:
            live_match = 0
        return max(0, min(live_match, len(prompt) - 1))

    def save_context(self) -> None:
        """Save the live context in the prefix cache now, between requests.

        A request for another conversation would otherwise copy it out first, on
        its way to the first token (3 to 15 ms for 300 tokens of SmolLM2 here;
        docs/benchmarks.md). The worker calls this after each answer's final event.
        """
        live = self.llm.input_ids[: self.llm.n_tokens].tolist()
        if not self._live_saved and len(live) >= SAVE_MIN_DISCARDED_TOKENS:
            self._save_live(live)

    def _save_live(self, live: list[int]) -> None:
        if self.prefix_cache.capacity_bytes <= 0:
            return
        ctx = self.llm._ctx.ctx
        self.llm._ctx.kv_cache_seq_rm(-1, len(live), -1)
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        if size > self.prefix_cache.capacity_bytes:
            return
        # Written in place into the bytes the cache keeps: one copy of the cells.
        data = bytearray(size)
        written = llama_cpp.llama_state_seq_get_data(
            ctx, (ctypes.c_uint8 * size).from_buffer(data), size, 0
        )
        if written:
            self.prefix_cache.put(live, data if written == size else data[:written])
            self._live_saved = tuple(live) in self.prefix_cache

    def _restore(self, key: tuple[int, ...]) -> bool:
        llm = self.llm
        data = self.prefix_cache.take(key)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
        array = ctypes.c_uint8 * len(data)
        # llama.cpp only reads it: a saved bytearray is lent as it is, without a copy.
        buffer = (
            array.from_buffer(data) if isinstance(data, bytearray) else array.from_buffer_copy(data)
        )
        if llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buffer, len(data), 0) == 0:
            llm.n_tokens = 0
            return False
        llm.input_ids[: len(key)] = key
        llm.n_tokens = len(key)
        return True


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _decode_error(exc: RuntimeError) -> Exception:
    """llama-cpp-python raises RuntimeError("llama_decode returned N"); say what N means."""
    message = str(exc)
    code = message.rsplit(" ", 1)[-1]
    try:
        meaning = DECODE_ERRORS.get(int(code))
    except ValueError:
        meaning = None
    if meaning is None:
        return exc
    return DecodeError(f"llama.cpp could not evaluate the prompt: {meaning} ({message}).")


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether the CPU offers AMX (Intel Sapphire Rapids and later), from the flags
    in /proc/cpuinfo (or the text given)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "amx_int8" in line.split(":", 1)[-1].split()
    return False


def use_extra_buffers(choice: str | None = None) -> bool:
    """Whether llama.cpp may repack weights into its extra CPU buffer types
    (LLAMA_EXTRA_BUFFERS: "on", "off" or "auto", the default).

    "auto" turns them off on CPUs with AMX: there llama.cpp moves the weights into
    its AMX buffer, and its AMX matrix multiplication crashes the process with a
    segmentation fault on the first prompt (llama.cpp issue 20824, seen with
    llama-cpp-python 0.3.36 and SmolLM2's Q4_1 here). Elsewhere llama.cpp's default
    stands. Weights offloaded to a GPU are not affected either way.
    """
    if choice is None:
        choice = os.environ.get("LLAMA_EXTRA_BUFFERS", "auto")
    choice = choice.strip().lower()
    if choice in {"on", "1", "true", "yes"}:
        return True
    if choice in {"off", "0", "false", "no"}:
        return False
    if choice not in {"auto", ""}:
        raise ValueError(f'LLAMA_EXTRA_BUFFERS must be "on", "off" or "auto", not {choice!r}')
    return not cpu_has_amx()


@contextmanager
def _model_params(callback: Callable[[float], None] | None, extra_buffers: bool):
    """Pass llama.cpp's model-load progress (0..1) to `callback`, and the extra
    buffer choice to the load.

    llama-cpp-python builds the model parameters inside Llama() and offers no
    argument for either, so the default parameters it starts from are wrapped for
    the duration of the load (one load at a time per process).
    """
    low_level = llama_cpp.llama_cpp
    original = low_level.llama_model_default_params

    def report(progress: float, _data) -> bool:
        try:
            callback(float(progress))
        except Exception:  # noqa: BLE001 - progress must never abort a load
            pass
        return True

    c_report = low_level.llama_progress_callback(report) if callback is not None else None

    def wrapped():
        params = original()
        if c_report is not None:
            params.progress_callback = c_report
        params.use_extra_bufts = extra_buffers
        return params

    low_level.llama_model_default_params = wrapped
    try:
        yield
    finally:
        low_level.llama_model_default_params = original


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
