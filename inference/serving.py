"""The model worker process: one engine for its model, and its heartbeat.

`manage.py modelworker NAME` runs a Celery worker whose pool is threads in one
process. The process loads the model once, before it takes any task, into an Engine
whose own thread decodes every sequence (inference/engine.py). Each generation is a
task in a pool thread: it hands its request to the engine and streams what comes
back (inference/tasks.py). So a worker has as many generations in flight as the
engine has sequences, and each one's broker message is acknowledged when it ends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import llama_cpp
from django.conf import settings

from .engine import Engine, ModelLoadError, use_extra_buffers
from .gguf import GGUFError, inspect_gguf
from .models import LanguageModel, WorkerHeartbeat
from .registry import environment_notes, load_options
from .status import Announcer, announce_model_named
from .workers import Heartbeat, describe_device

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def pool_size(model: LanguageModel) -> int:
    """Celery pool threads for a model worker: one per sequence, and as many again
    waiting at the engine's door, so that a freed sequence is taken at once."""
    return max(2, 2 * model.n_parallel)


class FlashAttentionChoice(logging.Filter):
    """What llama.cpp chose for flash attention "auto" when it created the context:
    it says so in one INFO line ("resolve_fused_ops: Flash Attention enabled", or
    "... not supported, set to disabled"; "enabling flash_attn since it is required
    for ..."), among thousands about tensors and graphs. While installed (a context
    manager around the load), llama.cpp's INFO lines reach the "llama.cpp" logger,
    this filter reads them, and only those the logger let through before go on."""

    def __init__(self):
        super().__init__()
        self.choice: str | None = None
        self._logger = logging.getLogger("llama.cpp")
        self._level = self._logger.level

    def __enter__(self) -> FlashAttentionChoice:
        self._passes = self._logger.getEffectiveLevel()
        self._logger.addFilter(self)
        self._logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.setLevel(self._level)
        self._logger.removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Flash Attention enabled" in message or "enabling flash_attn" in message:
            self.choice = "on"
        elif "Flash Attention not supported" in message:
            self.choice = "off"
        return record.levelno >= self._passes


def in_force(engine: Engine, flash_attn: str | None = None) -> dict:
    """The load options the loaded engine runs with, from llama.cpp's context where
    it says (threads, context, sequences, batch sizes): what the heartbeat and the
    Workers page show, and what a restart's settings are checked against."""
    ctx, options = engine.ctx, engine.options
    return {
        "n_threads": llama_cpp.llama_n_threads(ctx),
        "n_threads_batch": llama_cpp.llama_n_threads_batch(ctx),
        "n_ctx": llama_cpp.llama_n_ctx(ctx),
        "n_parallel": llama_cpp.llama_n_seq_max(ctx),
        "job_sequences": engine.job_sequences,
        "n_batch": llama_cpp.llama_n_batch(ctx),
        "n_ubatch": llama_cpp.llama_n_ubatch(ctx),
        # For "auto": what llama.cpp chose, where the load's log said it.
        "flash_attn": flash_attn or options.flash_attn,
        "type_k": options.type_k,
        "type_v": options.type_v,
        "n_gpu_layers": options.n_gpu_layers,
        "split_mode": options.split_mode,
        "extra_buffers": "on" if use_extra_buffers() else "off",
        "prefix_cache_mb": engine.prefix_cache.capacity_bytes // (1024 * 1024),
    }


class ModelServer:
    """This process's model: loaded once, shared by every task thread."""

    _current: ModelServer | None = None

    def __init__(self, model: LanguageModel):
        self.model = model
        self.engine: Engine | None = None
        self.error = ""
        self.pool_threads: int | None = None  # Celery's, when Celery started this process
        self._lock = threading.Lock()
        self.held: set[int] = set()  # generations this process holds
        self.running: set[int] = set()  # of those, admitted to a sequence
        self.heartbeat = Heartbeat(
            model.name, describe_device(model.n_gpu_layers, model.split_mode, model.main_gpu)
        )
        self.heartbeat.sample = self._sample
        # Loading, its progress, ready, an answer admitted or ended, stopped: each
        # reaches the chat pages watching this model (if the status changed).
        self.heartbeat.written = Announcer(model.name).poke

    @classmethod
    def current(cls) -> ModelServer | None:
        return cls._current

    @classmethod
    def start(cls, model_name: str, pool_threads: int | None = None) -> ModelServer | None:
        """Load the named model into this process (the heartbeat says "loading" with
        llama.cpp's progress, then "ready" or "failed" with the reason)."""
        model = LanguageModel.objects.filter(name=model_name).first()
        if model is None:
            log.error("no model named %r is registered", model_name)
            return None
        server = cls._current = cls(model)
        server.pool_threads = pool_threads
        try:
            notes = environment_notes(model)
        except Exception:  # noqa: BLE001 - a note never keeps the model from loading
            log.exception("could not compare the environment with the registry")
            notes = []
        for note in notes:
            log.warning("model %s: %s", model, note)
        server.heartbeat.state["notes"] = notes
        server.heartbeat.start()
        server.load()
        return server

    def load(self) -> None:
        options = load_options(self.model)
        try:
            # The header is checked first: a missing, truncated or foreign file gets a
            # precise reason instead of llama.cpp's "failed to load model".
            inspect_gguf(options.path)
            with FlashAttentionChoice() as flash_attn:
                engine = Engine(
                    options,
                    prefix_cache_bytes=settings.ENGINE_PREFIX_CACHE_MB * 1024 * 1024,
                    job_sequences=self.model.job_sequences,
                    on_load_progress=self.heartbeat.loading_progress,
                )
            self.engine = engine.start()
        except (GGUFError, ModelLoadError, MemoryError) as exc:
            self.error = str(exc) if not isinstance(exc, MemoryError) else "out of memory"
            log.error("model %s failed to load in pid %s: %s", self.model, os.getpid(), exc)
            self.heartbeat.report(state=WorkerHeartbeat.FAILED, reason=self.error)
            return
        settings_in_force = in_force(self.engine, flash_attn.choice)
        if self.pool_threads:
            settings_in_force["pool_threads"] = self.pool_threads
        log.info(
            "model %s loaded in pid %s; in force: %s",
            self.model,
            os.getpid(),
            " ".join(f"{key}={value}" for key, value in settings_in_force.items()),
        )
        self.heartbeat.report(
            state=WorkerHeartbeat.READY, load_progress=1.0, reason="", in_force=settings_in_force
        )

    def stop(self) -> None:
        self.heartbeat.stop()
        announce_model_named(self.model.name)  # now, before the process ends
        if self.engine is not None:
            self.engine.close()

    def hold(self, generation_id: int) -> None:
        with self._lock:
            self.held.add(generation_id)
        self.heartbeat.report_soon()

    def started(self, generation_id: int) -> None:
        with self._lock:
            self.running.add(generation_id)
        self.heartbeat.report_soon()

    def stopped(self, generation_id: int) -> None:
        """Its run is over; its bookkeeping may still be going on (held)."""
        with self._lock:
            self.running.discard(generation_id)
        self.heartbeat.report_soon()

    def release(self, generation_id: int) -> None:
        with self._lock:
            self.held.discard(generation_id)
            self.running.discard(generation_id)
        self.heartbeat.report_soon()

    def _sample(self) -> dict:
        """What the heartbeat reports each time it writes."""
        with self._lock:
            running, held = sorted(self.running), sorted(self.held)
        changes = {"generations": running, "held": held}
        if self.engine is not None:
            changes["state"] = WorkerHeartbeat.BUSY if running else WorkerHeartbeat.READY
            changes["engine"] = {
                **self.engine.load,
                "n_parallel": self.engine.n_parallel,
                "n_threads": self.engine.n_threads,
                "n_threads_batch": self.engine.n_threads_batch,
            }
        return changes
