"""The model, through llama.cpp: one context serving several sequences at once.

Knows nothing of Django, requests or sockets. One Engine per worker process, created
inside it. Its own thread owns the llama.cpp context and runs the loop of llama.cpp's
server (tools/server in llama.cpp's source):

- each step decodes one token for every sequence that is generating, plus a chunk
  of prompt tokens for sequences still reading theirs, up to n_batch tokens in all,
  in one llama_decode (continuous batching with chunked prefill): a long prompt
  holds the other streams up for one chunk at a time, never for all of it;
- each sequence samples with its own sampler chain (temperature, top_p, seed,
  grammar), and stops on its own stop strings;
- all sequences share one KV pool of n_ctx cells (llama.cpp's unified KV cache). A
  request is admitted only when its prompt plus max_tokens fits what running
  requests leave free, so none of them can ever run out of room; until then it waits;
- an idle sequence keeps its tokens in the pool for the next request of the same
  tenant (prefix reuse), until the room is needed, least recently used first, or
  until another request starts while its state is already copied to host RAM
  (kept there up to a budget, for that tenant only): in a unified cache every
  decode step attends over every used cell, so idle cells slow the others down.

Callers hand a Request to submit() and read its events from request.events.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from .cpus import math_threads

log = logging.getLogger(__name__)

GGML_CACHE_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}
FLASH_ATTN_TYPES = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
# How a model spreads over several GPUs (llama.h: llama_split_mode).
SPLIT_MODES = {
    "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
}
# The length of llama_model_params.tensor_split (llama_max_devices()).
MAX_DEVICES = llama_cpp.LLAMA_MAX_DEVICES

# Priorities: interactive work (chat, API) is admitted before background job passes.
INTERACTIVE = 0
BACKGROUND = 1

# An idle sequence's cache is copied to host RAM before its cells are given to
# another request only if it holds at least this many tokens.
SAVE_MIN_TOKENS = 32


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


class ModelLoadError(RuntimeError):
    """llama.cpp could not load the model; the message names the file and the cause."""


class DecodeError(RuntimeError):
    """llama.cpp could not evaluate a batch (out of memory, KV cache full...)."""


# What llama_decode's return codes mean (llama.h), in words for the user.
DECODE_ERRORS = {
    1: "no room in the KV cache for the batch",
    -1: "invalid input batch",
    -2: "out of memory: could not allocate the compute buffers",
    -3: "the computation failed",
}


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
    split_mode: str = "layer"
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()  # empty: llama.cpp's default, by free memory


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # A GBNF grammar the answer must follow (structured output), or None.
    grammar: str | None = None
    # Regular expressions: if any, the grammar is lazy. The answer is free until one
    # matches its text; from the match on, the grammar holds it (tool calls, "auto").
    grammar_triggers: tuple[str, ...] = ()


@dataclass
class RunStats:
    """What one request cost, filled in by the engine. Times are time.monotonic()."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    started: float = 0.0  # admitted: its prompt evaluation begins
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_reason: str = ""
    # How many sequences shared the steps that decoded this one's tokens.
    batch_steps: int = 0
    batch_size_sum: int = 0
    batch_size_max: int = 0

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

    @property
    def batch_size_mean(self) -> float | None:
        return self.batch_size_sum / self.batch_steps if self.batch_steps else None

    def inter_token_ms(self) -> list[float]:
        times = self.token_times
        return [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]


@dataclass(eq=False)
class Request:
    """One sequence's work. The engine reports on `events`, in order:

    ("admitted", None)        it has a sequence; its prompt evaluation starts
    ("progress", (done, n))   after each chunk of a prompt longer than one chunk
    ("text", str)             a piece of the answer (about a token)
    ("end", None | error)     finished (stats.finish_reason says why) or failed

    Setting `cancel` ends it within one step, waiting or running.
    """

    prompt: list[int]
    sampling: Sampling
    tenant: str
    priority: int = INTERACTIVE
    deadline: float | None = None  # time.monotonic(); the run ends at it
    label: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    stats: RunStats = field(default_factory=RunStats)
    arrival: int = 0

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens

    def cells_needed(self, n_ctx: int) -> int:
        """KV cells it may use: its prompt and every token it may add."""
        return min(n_ctx, len(self.prompt) + self.max_tokens)


IDLE, PROMPT, GENERATING = "idle", "prompt", "generating"


class Slot:
    """One sequence of the context: idle (maybe caching a tenant's tokens), reading
    a prompt, or generating."""

    def __init__(self, seq_id: int):
        self.seq_id = seq_id
        self.state = IDLE
        self.request: Request | None = None
        self.tokens: list[int] = []  # what its KV cells hold, in order
        self.tenant: str | None = None  # whose tokens those are
        self.saved = False  # its tokens are in the host-RAM cache as they stand
        self.last_used = 0.0
        self.sampler = None
        self.next_token: int | None = None  # sampled, to be fed at the next step
        self.batch_index = -1  # where its logits are in the step's batch
        self.chunk = 0  # prompt tokens in this step's batch
        self.pending = b""  # bytes of a UTF-8 character not complete yet
        self.held = ""  # text that may be the start of a stop string

    @property
    def busy(self) -> bool:
        return self.state != IDLE


class PrefixCache:
    """Saved KV states of idle sequences, keyed by tenant and tokens: an LRU bounded
    by a budget of host RAM (bytes). A tenant only ever finds its own states."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._states: OrderedDict[tuple[str, tuple[int, ...]], bytearray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    @property
    def size_bytes(self) -> int:
        return sum(len(data) for data in self._states.values())

    def put(self, tenant: str, tokens: Sequence[int], data: bytearray) -> bool:
        if len(data) > self.capacity_bytes:
            return False
        key = (tenant, tuple(tokens))
        # A state of this tenant whose tokens are a prefix of the new one is redundant.
        for old in [k for k in self._states if k[0] == tenant and key[1][: len(k[1])] == k[1]]:
            del self._states[old]
        self._states[key] = data
        while self.size_bytes > self.capacity_bytes:
            self._states.popitem(last=False)
        return True

    def longest(self, tenant: str, prompt: Sequence[int]) -> tuple[tuple | None, int]:
        """This tenant's saved key sharing the longest prefix with prompt, and its length."""
        best, best_len = None, 0
        for key in self._states:
            if key[0] == tenant:
                n = common_prefix(key[1], prompt)
                if n > best_len:
                    best, best_len = key, n
        return best, best_len

    def take(self, key: tuple) -> bytearray:
        self._states.move_to_end(key)
        return self._states[key]


def physical_cores() -> int:
    """The thread count llama.cpp's own tools choose by default on this machine
    (common_cpu_get_num_math): the physical cores, or on a hybrid Intel CPU the
    performance cores (inference/cpus.py)."""
    return math_threads()


def resolve_threads(n_threads: int, n_threads_batch: int) -> tuple[int, int]:
    """The thread counts in force: 0 means llama.cpp's own default, the physical
    cores, for decoding; and the decoding count for prompt evaluation."""
    decode = n_threads or physical_cores()
    return decode, n_threads_batch or decode


class Engine:
    """A loaded GGUF model and one context of n_parallel sequences, driven by its
    own thread (start() it; submit() requests from any thread)."""

    def __init__(
        self,
        options: LoadOptions,
        *,
        prefix_cache_bytes: int = 0,
        job_sequences: int | None = None,
        on_load_progress: Callable[[float], None] | None = None,
    ):
        self.options = options
        self.n_threads, self.n_threads_batch = resolve_threads(
            options.n_threads, options.n_threads_batch
        )
        self.n_parallel = max(1, options.n_parallel)
        # Background passes use at most this many sequences at once.
        self.job_sequences = self.n_parallel if job_sequences is None else job_sequences
        capture_llama_log()
        try:
            extra_buffers = use_extra_buffers()
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        llama_cpp.llama_backend_init()
        self.model = _load_model(options, on_load_progress, extra_buffers)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.ctx = self._new_context()
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, self.n_parallel), 0, 1)
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        self._piece = ctypes.create_string_buffer(256)
        self.slots = [Slot(i) for i in range(self.n_parallel)]
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: list[Request] = []
        self._arrivals = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Read by other threads (heartbeat, metrics); written by the engine thread.
        self.load = {"running": 0, "waiting": 0, "kv_used": 0, "jobs_held": 0}
        self._jobs_held = 0
        self._jobs_lock = threading.Lock()

    def _new_context(self):
        options = self.options
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = options.n_ctx
        params.n_batch = options.n_batch
        params.n_ubatch = min(options.n_batch, 512)
        params.n_seq_max = self.n_parallel
        params.kv_unified = True
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads_batch
        params.flash_attn_type = FLASH_ATTN_TYPES[options.flash_attn]
        params.type_k = GGML_CACHE_TYPES[options.type_k]
        params.type_v = GGML_CACHE_TYPES[options.type_v]
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            llama_cpp.llama_model_free(self.model)
            raise ModelLoadError(
                f"{options.path}: llama.cpp could not create a context of {options.n_ctx:,} "
                f"tokens for {self.n_parallel} sequences (KV {options.type_k}/"
                f"{options.type_v}, flash attention {options.flash_attn}); see the "
                "worker's log for llama.cpp's reason"
            )
        return ctx

    # --- what the file says -----------------------------------------------------
    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def check_fits(self, prompt_tokens: int, max_tokens: int = 1) -> None:
        """A prompt must leave room for at least one new token; max_tokens beyond the
        context's end are cut to it (the answer then ends with "length")."""
        if prompt_tokens + 1 > self.n_ctx:
            raise ContextOverflow(prompt_tokens, max_tokens, self.n_ctx)

    # --- the API for other threads ------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request) -> Request:
        """Queue a request; its events follow on request.events."""
        request.stats.prompt_tokens = len(request.prompt)
        self._inbox.put(request)
        return request

    def cancel(self, request: Request) -> None:
        """End the request within one step, waiting or running."""
        request.cancel.set()
        self._inbox.put(None)  # wakes the loop if it waits for work

    def reserve_job(self) -> bool:
        """Hold one of the job_sequences places for a background request, or say
        there is none free (the caller asks again later instead of waiting here)."""
        with self._jobs_lock:
            if self._jobs_held >= self.job_sequences:
                return False
            self._jobs_held += 1
            return True

    def release_job(self) -> None:
        with self._jobs_lock:
            self._jobs_held = max(0, self._jobs_held - 1)

    def close(self) -> None:
        """Stop the loop, fail what is left, and free llama.cpp's memory."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(10)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    # --- the loop -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - every request still ends, with the reason
                log.exception("the engine's step failed")
                for slot in self.slots:
                    if slot.busy:
                        self._end(slot, "error", exc)
                        self._forget(slot)
        for request in self._waiting:
            request.events.put(("end", RuntimeError("the worker is shutting down")))
        for slot in self.slots:
            if slot.busy:
                self._end(slot, "error", RuntimeError("the worker is shutting down"))

    def _step(self) -> None:
        self._take_inbox(block=False)
        self._end_cancelled()
        self._admit()
        self._publish_load()
        if not any(slot.busy for slot in self.slots):
            if not self._waiting:
                self._save_idle_slots()
            # Nothing to decode: wait for a request, a cancel, or a deadline to check.
            self._take_inbox(block=True)
            return
        self._decode(self._build_batch())

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.25) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                item.arrival = next(self._arrivals)
                self._waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _end_cancelled(self) -> None:
        now = time.monotonic()
        for request in list(self._waiting):
            reason = _stop_reason(request, now)
            if reason:
                self._waiting.remove(request)
                request.stats.finish_reason = reason
                request.stats.finished = now
                request.events.put(("end", None))
        for slot in self.slots:
            if slot.busy:
                reason = _stop_reason(slot.request, now)
                if reason:
                    self._end(slot, reason)

    # --- admission ------------------------------------------------------------------
    def _cells_reserved(self) -> int:
        return sum(s.request.cells_needed(self.n_ctx) for s in self.slots if s.busy)

    def _admit(self) -> None:
        """Give free sequences to waiting requests: interactive first, then in order
        of arrival. The first that does not fit waits, and so do all behind it of its
        priority, so that a large request is not passed over forever."""
        self._waiting.sort(key=lambda r: (r.priority, r.arrival))
        blocked: set[int] = set()
        for request in list(self._waiting):
            if request.priority in blocked:
                continue
            try:
                self.check_fits(len(request.prompt), request.max_tokens)
            except ContextOverflow as exc:
                self._waiting.remove(request)
                request.events.put(("end", exc))
                continue
            free_slots = [s for s in self.slots if not s.busy]
            room = self.n_ctx - self._cells_reserved()
            if not free_slots or request.cells_needed(self.n_ctx) > room:
                blocked.add(request.priority)
                continue
            running_jobs = sum(1 for s in self.slots if s.busy and s.request.priority == BACKGROUND)
            if request.priority == BACKGROUND and running_jobs >= self.job_sequences:
                blocked.add(request.priority)
                continue
            self._waiting.remove(request)
            self._start(request, free_slots)

    def _start(self, request: Request, free_slots: list[Slot]) -> None:
        slot, reused = self._choose_slot(request, free_slots)
        # Room for it: idle caches go, least recently used first, until every
        # running request's whole reservation fits beside what stays cached.
        reserved = self._cells_reserved() + request.cells_needed(self.n_ctx)
        for other in sorted(free_slots, key=lambda s: s.last_used):
            if other is slot:
                continue
            cached = sum(len(s.tokens) for s in self.slots if not s.busy and s is not slot)
            if reserved + cached <= self.n_ctx:
                break
            if other.tokens:
                self._evict(other)
        # Idle caches already in host RAM give their cells back: restoring one later
        # is a copy, while every decode step until then would attend over its cells
        # (about -14 % per step for three idle answers: make bench ONLY=kv-cells).
        for other in free_slots:
            if other is not slot and other.saved and other.tokens:
                self._evict(other)
        slot.state = PROMPT
        slot.request = request
        slot.tenant = request.tenant
        slot.saved = False
        slot.sampler = Sampler(self.vocab, request.sampling)
        slot.pending, slot.held = b"", ""
        slot.next_token = None
        stats = request.stats
        stats.started = time.monotonic()
        stats.cached_tokens = reused
        request.events.put(("admitted", None))

    def _choose_slot(self, request: Request, free_slots: list[Slot]) -> tuple[Slot, int]:
        """The free sequence to run it in, and how many prompt tokens it already holds
        (at most all but the last, which is evaluated for its logits). Only the
        request's own tenant's tokens count."""
        prompt = request.prompt
        limit = len(prompt) - 1

        def reusable(slot: Slot) -> int:
            if slot.tenant != request.tenant:
                return 0
            return min(common_prefix(slot.tokens, prompt), limit)

        # The most tokens to reuse; among equals, an empty sequence, then the one
        # idle longest, so that other tenants' caches stay as long as they can.
        best = max(free_slots, key=lambda s: (reusable(s), not s.tokens, -s.last_used))
        reused = reusable(best)
        saved_key, saved_len = self.prefix_cache.longest(request.tenant, prompt)
        saved_len = min(saved_len, limit)
        if saved_len > reused:
            # A saved state is better: restore it into the least useful free sequence.
            data = self.prefix_cache.take(saved_key)
            target = min(free_slots, key=lambda s: (reusable(s), bool(s.tokens), s.last_used))
            if target.tokens:
                self._evict(target)
            if self._restore(target, saved_key, data):
                return target, self._keep(target, saved_len)
            best, reused = target, 0
        if best.tenant != request.tenant and best.tokens:
            self._evict(best)
        elif len(best.tokens) - reused >= SAVE_MIN_TOKENS and not best.saved:
            self._save(best)  # what the new request overwrites may be wanted again
        return best, self._keep(best, reused)

    def _keep(self, slot: Slot, n: int) -> int:
        """Keep the first n tokens of the slot's cells; drop the rest."""
        if n < len(slot.tokens):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, n, -1)
            slot.tokens = slot.tokens[:n]
        return n

    def _evict(self, slot: Slot) -> None:
        """Give the slot's cells back, saving them to host RAM first when worth it."""
        if not slot.saved and len(slot.tokens) >= SAVE_MIN_TOKENS and slot.tenant:
            self._save(slot)
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens, slot.tenant, slot.saved = [], None, False

    def _save(self, slot: Slot) -> None:
        if self.prefix_cache.capacity_bytes <= 0:
            return
        size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.seq_id)
        if not size or size > self.prefix_cache.capacity_bytes:
            return
        data = bytearray(size)
        written = llama_cpp.llama_state_seq_get_data(
            self.ctx, (ctypes.c_uint8 * size).from_buffer(data), size, slot.seq_id
        )
        if written:
            slot.saved = self.prefix_cache.put(
                slot.tenant, slot.tokens, data if written == size else data[:written]
            )

    def _restore(self, slot: Slot, key: tuple, data: bytearray) -> bool:
        buffer = (ctypes.c_uint8 * len(data)).from_buffer(data)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buffer, len(data), slot.seq_id) == 0:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.tokens, slot.tenant = [], None
            return False
        slot.tenant, slot.tokens, slot.saved = key[0], list(key[1]), True
        return True

    def _save_idle_slots(self) -> None:
        """With nothing to do, copy idle caches to host RAM, so that handing their
        cells to another tenant later costs no time on that request's way."""
        for slot in self.slots:
            if not slot.busy and not slot.saved and len(slot.tokens) >= SAVE_MIN_TOKENS:
                if not self._inbox.empty():
                    return
                self._save(slot)

    # --- one step ----------------------------------------------------------------------
    def _build_batch(self) -> int:
        batch = self._batch
        n = 0
        for slot in self.slots:
            slot.batch_index, slot.chunk = -1, 0
            if slot.state == GENERATING:
                _batch_add(batch, n, slot.next_token, len(slot.tokens), slot.seq_id, True)
                slot.batch_index = n
                n += 1
        # Then prompt chunks, up to n_batch tokens in all: interactive first, and among
        # them the least left to read first. So a short chat's prompt goes into the
        # next step whole, beside a long prompt's chunk, instead of waiting for all of
        # it (llama.cpp's server takes them in slot order: there, chats behind a long
        # prompt wait for its whole evaluation). The long one still gets what is left.
        readers = [s for s in self.slots if s.state == PROMPT]
        readers.sort(
            key=lambda s: (
                s.request.priority,
                len(s.request.prompt) - len(s.tokens),
                s.request.arrival,
            )
        )
        for slot in readers:
            room = self.n_batch - n
            if room <= 0:
                break
            prompt = slot.request.prompt
            start = len(slot.tokens)
            chunk = prompt[start : start + room]
            last = start + len(chunk) == len(prompt)
            for i, token in enumerate(chunk):
                logits = last and i == len(chunk) - 1
                _batch_add(batch, n, token, start + i, slot.seq_id, logits)
                if logits:
                    slot.batch_index = n
                n += 1
            slot.chunk = len(chunk)
        batch.n_tokens = n
        return n

    def _decode(self, n_tokens: int) -> None:
        code = llama_cpp.llama_decode(self.ctx, self._batch)
        if code != 0:
            error = DecodeError(
                "llama.cpp could not evaluate the batch: "
                f"{DECODE_ERRORS.get(code, 'error')} (llama_decode returned {code})."
            )
            for slot in self.slots:
                if slot.busy and (slot.batch_index >= 0 or slot.chunk):
                    self._end(slot, "error", error)
                    self._forget(slot)
            return
        now = time.monotonic()
        in_batch = sum(1 for s in self.slots if s.batch_index >= 0 or s.chunk)
        for slot in self.slots:
            if slot.state == PROMPT and slot.chunk:
                request = slot.request
                slot.tokens.extend(request.prompt[len(slot.tokens) : len(slot.tokens) + slot.chunk])
                total = len(request.prompt)
                if total - request.stats.cached_tokens > self.n_batch:
                    request.events.put(("progress", (len(slot.tokens), total)))
                if len(slot.tokens) < total:
                    continue
                slot.state = GENERATING
            elif slot.state == GENERATING and slot.batch_index >= 0:
                slot.tokens.append(slot.next_token)
            else:
                continue
            stats = slot.request.stats
            stats.batch_steps += 1
            stats.batch_size_sum += in_batch
            stats.batch_size_max = max(stats.batch_size_max, in_batch)
            token = slot.sampler.sample(self.ctx, slot.batch_index)
            self._accept(slot, token, now)

    def _accept(self, slot: Slot, token: int, now: float) -> None:
        """A sampled token: stream its text, or end the request."""
        request = slot.request
        stats = request.stats
        if stats.first_token is None:
            stats.first_token = now
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._end(slot, "stop")
            return
        stats.completion_tokens += 1
        stats.token_times.append(now)
        text, slot.pending = _decode_complete_utf8(slot.pending + self._token_bytes(token))
        slot.held += text
        emit, slot.held, hit_stop = _split_on_stop(slot.held, request.sampling.stop)
        if emit:
            request.events.put(("text", emit))
        if hit_stop:
            self._end(slot, "stop", flush=False)
            return
        if stats.completion_tokens >= request.max_tokens or len(slot.tokens) + 1 >= self.n_ctx:
            self._end(slot, "length")
            return
        slot.next_token = token

    def _token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(
            self.vocab, token, self._piece, len(self._piece), 0, False
        )
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(
                self.vocab, token, self._piece, len(self._piece), 0, False
            )
        return self._piece.raw[:n]

    def _end(self, slot: Slot, reason: str, error: Exception | None = None, flush=True) -> None:
        """Finish the slot's request. Its cells stay, for its tenant's next request."""
        request = slot.request
        stats = request.stats
        if error is None:
            stats.finish_reason = reason
            if flush and reason not in ("cancelled",) and slot.held:
                request.events.put(("text", slot.held))
        stats.finished = time.monotonic()
        request.events.put(("end", error))
        if slot.sampler is not None:
            slot.sampler.free()
        slot.sampler = None
        slot.request = None
        slot.state = IDLE
        slot.next_token = None
        slot.last_used = stats.finished
        slot.saved = False

    def _forget(self, slot: Slot) -> None:
        """Drop the slot's cells: after a failed step their state is unknown."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens, slot.tenant, slot.saved = [], None, False

    def _publish_load(self) -> None:
        running = [s for s in self.slots if s.busy]
        self.load = {
            "running": len(running),
            "waiting": len(self._waiting),
            "kv_used": sum(len(s.tokens) for s in self.slots),
            "kv_reserved": self._cells_reserved(),
            "n_ctx": self.n_ctx,
        }


# ggml_log_level (ggml.h: 1 debug, 2 info, 3 warn, 4 error, 5 continuation) as
# Python's levels: llama.cpp's INFO lines (every tensor of a load) are DEBUG here.
# (llama-cpp-python's own callback maps an older numbering, in which info is a
# warning, and prints the whole load log whatever its verbosity.)
_LLAMA_LOG_LEVELS = {
    1: logging.DEBUG,
    2: logging.DEBUG,
    3: logging.WARNING,
    4: logging.ERROR,
}
llama_log = logging.getLogger("llama.cpp")
# The last lines llama.cpp logged, whatever their level: what a load reported
# (layers offloaded, buffer sizes), for the device check and load errors.
LLAMA_LOG_TAIL: deque[str] = deque(maxlen=400)
_log_level = logging.DEBUG


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, _user_data) -> None:
    global _log_level
    if level != 5:  # 5: the continuation of the previous line
        _log_level = _LLAMA_LOG_LEVELS.get(level, logging.DEBUG)
    line = text.decode("utf-8", "replace").rstrip("\n")
    if line:
        LLAMA_LOG_TAIL.append(line)
        if llama_log.isEnabledFor(_log_level):
            llama_log.log(_log_level, "%s", line)


def capture_llama_log() -> None:
    """Route llama.cpp's log into Python's logging (logger "llama.cpp")."""
    llama_cpp.llama_log_set(_llama_log, None)


def _stop_reason(request: Request, now: float) -> str:
    if request.cancel.is_set():
        return "cancelled"
    if request.deadline is not None and now >= request.deadline:
        return "time_limit"
    return ""


def _batch_add(batch, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits


class Sampler:
    """One request's sampling: llama.cpp's sampler chain, and its grammar if it has
    one, applied as llama.cpp's server applies it (common_sampler_sample): the chain
    draws a token from the whole vocabulary, the grammar checks that one token, and
    only if the grammar refuses it is the draw made again with the grammar first over
    every token. Checking all 49k tokens of SmolLM2's vocabulary against a grammar
    takes about 25 ms a step on a CPU; most draws fit and need none of that."""

    def __init__(self, vocab, sampling: Sampling):
        self.vocab = vocab
        self.grammar = None
        if sampling.grammar:
            self.grammar = _grammar_sampler(vocab, sampling)
            if not self.grammar:
                raise ValueError("llama.cpp could not parse the grammar")
        self.chain = _sampler_chain(sampling)
        self._one = llama_cpp.llama_token_data()
        self._one_array = llama_cpp.llama_token_data_array(
            data=ctypes.pointer(self._one), size=1, selected=-1, sorted=False
        )

    def sample(self, ctx, index: int) -> int:
        token = llama_cpp.llama_sampler_sample(self.chain, ctx, index)
        if self.grammar is None:
            return token
        if not self._grammar_allows(token):
            token = self._sample_grammar_first(ctx, index)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        return token

    def _grammar_allows(self, token: int) -> bool:
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(self._one_array))
        return self._one.logit != -math.inf

    def _sample_grammar_first(self, ctx, index: int) -> int:
        n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        logits = llama_cpp.llama_get_logits_ith(ctx, index)
        candidates = np.empty(n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        candidates["id"] = np.arange(n_vocab, dtype=np.int32)
        candidates["logit"] = np.ctypeslib.as_array(logits, shape=(n_vocab,))
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(array))
        token = int(candidates[array.selected]["id"])
        llama_cpp.llama_sampler_accept(self.chain, token)
        return token

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self.chain)
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
        self.chain = self.grammar = None


def _sampler_chain(sampling: Sampling):
    """llama.cpp's sampler chain for one request, in llama-cpp-python's order (the
    grammar is the Sampler's): top-k 40, top-p, min-p 0.05, temperature, then a draw
    with the seed (greedy at temperature 0)."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.temperature <= 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed
    for sampler in (
        llama_cpp.llama_sampler_init_top_k(40),
        llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1),
        llama_cpp.llama_sampler_init_min_p(0.05, 1),
        llama_cpp.llama_sampler_init_temp(sampling.temperature),
        llama_cpp.llama_sampler_init_dist(seed),
    ):
        llama_cpp.llama_sampler_chain_add(chain, sampler)
    return chain


def _grammar_sampler(vocab, sampling: Sampling):
    if not sampling.grammar_triggers:
        return llama_cpp.llama_sampler_init_grammar(vocab, sampling.grammar.encode(), b"root")
    patterns = (ctypes.c_char_p * len(sampling.grammar_triggers))(
        *(pattern.encode() for pattern in sampling.grammar_triggers)
    )
    return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
        vocab, sampling.grammar.encode(), b"root", patterns, len(patterns), None, 0
    )


# ggml-backend.h: enum ggml_backend_dev_type
GGML_DEVICE_GPU, GGML_DEVICE_IGPU = 1, 2


def gpu_device_count() -> int:
    """The GPUs llama.cpp can offload to in this process (0 in a CPU-only build, or
    with CUDA_VISIBLE_DEVICES=""), counted as llama.cpp's default device choice
    counts them: discrete GPUs, or else integrated ones."""
    from llama_cpp._ggml import libggml

    libggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    libggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    libggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    libggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_dev_type.restype = ctypes.c_int
    kinds = [
        libggml.ggml_backend_dev_type(libggml.ggml_backend_dev_get(i))
        for i in range(libggml.ggml_backend_dev_count())
    ]
    gpus, igpus = kinds.count(GGML_DEVICE_GPU), kinds.count(GGML_DEVICE_IGPU)
    return gpus or igpus


def check_gpu_split(options: LoadOptions, gpus: int) -> None:
    """What llama.cpp would refuse in its log only, or silently ignore, given the
    GPUs this worker sees: a main_gpu or more tensor_split shares than there are."""
    if options.n_gpu_layers == 0 or gpus == 0:
        return  # on the CPU the options do nothing
    if options.split_mode == "none" and options.main_gpu >= gpus:
        raise ModelLoadError(
            f"{options.path}: main_gpu is {options.main_gpu}, but this worker sees "
            f"{gpus} GPU{'s' if gpus != 1 else ''} (numbered from 0, after "
            "CUDA_VISIBLE_DEVICES)"
        )
    if len(options.tensor_split) > gpus:
        raise ModelLoadError(
            f"{options.path}: tensor_split has {len(options.tensor_split)} shares, but this "
            f"worker sees {gpus} GPU{'s' if gpus != 1 else ''}; llama.cpp would ignore the rest"
        )


def model_params(options: LoadOptions, extra_buffers: bool):
    """llama_model_params for the options, and the objects they point to, which
    must stay alive until the load returns (the tensor_split array)."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = options.n_gpu_layers
    params.use_extra_bufts = extra_buffers
    params.split_mode = SPLIT_MODES[options.split_mode]
    params.main_gpu = options.main_gpu
    keep = []
    if options.tensor_split:
        shares = (ctypes.c_float * MAX_DEVICES)(*options.tensor_split)
        params.tensor_split = ctypes.cast(shares, ctypes.POINTER(ctypes.c_float))
        keep.append(shares)
    return params, keep


def _load_model(options: LoadOptions, on_progress, extra_buffers: bool):
    """llama_model_load_from_file, with llama.cpp's load progress (0..1) passed to
    on_progress. A model in several files is given by its first file."""
    if options.n_gpu_layers != 0:
        check_gpu_split(options, gpu_device_count())
    params, keep = model_params(options, extra_buffers)

    def report(progress: float, _data) -> bool:
        if on_progress is not None:
            try:
                on_progress(float(progress))
            except Exception:  # noqa: BLE001 - progress must never abort a load
                pass
        return True

    callback = llama_cpp.llama_progress_callback(report)
    params.progress_callback = callback
    if not os.path.exists(options.path):
        raise ModelLoadError(f"{options.path}: no such file")
    model = llama_cpp.llama_model_load_from_file(options.path.encode(), params)
    del keep  # llama.cpp has copied tensor_split into the model
    if not model:
        raise ModelLoadError(
            f"{options.path}: llama.cpp could not load it (see the worker's log for its reason)"
        )
    return model


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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

    "auto" turns them off on CPUs with AMX: there llama.cpp's AMX matrix
    multiplication crashes the process on the first prompt (llama.cpp issue 20824,
    seen with llama-cpp-python 0.3.36). Elsewhere llama.cpp's default stands.
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
