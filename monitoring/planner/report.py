"""The planner's report: from what a user typed to a plan, with names resolved, the
model's files read, the pool split between users, and recorded runs compared.

The page and the `plan` command both call `make_report`; bad input raises PlanError
with a message that lists what would be valid. `suggested_n_parallel` is the answer
the registry's Mixtral preset takes (apps.py).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from inference.gguf import GGUFError, GGUFReport, inspect_gguf

from . import catalog
from .compute import (
    KV_TYPES,
    Architecture,
    Device,
    Plan,
    PlanError,
    Weights,
    plan,
    weights_from_parameters,
    weights_from_tensors,
)
from .concurrency import Concurrency, concurrency
from .measured import Comparison, compare

MAX_CONTEXT_TOKENS = 1 << 22  # beyond any model we plan; stops absurd input early


@dataclass(frozen=True)
class RuleOfThumb:
    """The rule-of-thumb size beside the real one, and what it would have promised."""

    bytes_per_param: float
    params: int
    weights_bytes: int
    real_weights_bytes: int
    headroom_bytes: int  # what the rule of thumb leaves on the device, weights only


@dataclass
class Report:
    plan: Plan
    model_label: str
    quant: str
    source_kind: str  # "catalog", "registered" or "file"
    path: str | None  # the file llama.cpp is given: the first of a split model's
    files: list[str]  # every file of the model (none for a catalog model)
    registered_name: str | None
    rule_of_thumb: RuleOfThumb | None
    claim: catalog.Claim | None
    comparisons: list[Comparison]
    concurrency: Concurrency | None

    @property
    def claim_fraction_of_bound(self) -> float | None:
        if self.claim is None:
            return None
        return self.claim.decode_tokens_per_s / self.plan.decode_bound_tokens_per_s

    def as_json(self) -> dict:
        data = {
            "model": self.model_label,
            "quant": self.quant,
            "source": self.source_kind,
            "path": self.path,
            "files": self.files,
            "registered_model": self.registered_name,
            "plan": self.plan.as_json(),
            "rule_of_thumb": asdict(self.rule_of_thumb) if self.rule_of_thumb else None,
            "claim": asdict(self.claim) if self.claim else None,
            "claim_fraction_of_bound": self.claim_fraction_of_bound,
            "measured": [asdict(c) for c in self.comparisons],
            "concurrency": _concurrency_json(self.concurrency),
        }
        if self.path:
            data["plan"]["settings"]["command_line"] = self.plan.settings.command_line(self.path)
        return data


def _concurrency_json(answer: Concurrency | None) -> dict | None:
    if answer is None:
        return None
    data = asdict(answer)
    data["aggregate_decode_tokens_per_s"] = answer.aggregate_decode_tokens_per_s
    data["per_sequence_decode_tokens_per_s"] = answer.per_sequence_decode_tokens_per_s
    for step in ("full", "empty"):
        data[step]["tokens_per_s"] = getattr(answer, step).tokens_per_s
    return data


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_device(name: str) -> Device:
    key = (name or "").strip().lower()
    if key in catalog.GPUS:
        return catalog.GPUS[key]
    if key in catalog.HOSTS:
        return replace(catalog.HOSTS[key], memory_bytes=host_memory_bytes())
    raise PlanError(
        f"unknown GPU {name!r}; valid: {catalog.names(catalog.GPUS)} "
        f"(or a CPU host: {catalog.names(catalog.HOSTS)})"
    )


def resolve_host(name: str) -> Device:
    key = (name or "").strip().lower()
    if key not in catalog.HOSTS:
        raise PlanError(f"unknown host {name!r}; valid: {catalog.names(catalog.HOSTS)}")
    return replace(catalog.HOSTS[key], memory_bytes=host_memory_bytes())


def resolve_quant(name: str | None) -> catalog.QuantType:
    by_upper = {k.upper(): v for k, v in catalog.QUANTS.items()}
    quant = by_upper.get((name or "").strip().upper())
    if quant is None:
        raise PlanError(
            f"unknown quantization {name!r}; valid: {catalog.names(catalog.QUANTS)}"
            if name
            else f"a catalog model needs a quantization; valid: {catalog.names(catalog.QUANTS)}"
        )
    return quant


def _registered(name: str):
    from inference.models import LanguageModel

    return LanguageModel.objects.filter(name=name).first()


def _model_choices() -> str:
    from inference.models import LanguageModel

    registered = list(LanguageModel.objects.values_list("name", flat=True))
    text = f"catalog models: {catalog.names(catalog.MODELS)}"
    if registered:
        text += f"; registered models: {', '.join(registered)}"
    return text + "; or the path of a GGUF file"


def _catalog_weights(model: catalog.CatalogModel, quant: catalog.QuantType) -> Weights:
    known = model.known_files.get(quant.name)
    if known:
        return weights_from_parameters(
            model.arch,
            file_bytes=known.bytes,
            source=f"a {model.label} {quant.name} file is {known.bytes / 1e9:.1f} GB "
            f"({known.source}); split over tensors in proportion to parameters",
        )
    file_bytes = round(model.arch.params_total * quant.file_bits_per_weight / 8)
    return weights_from_parameters(
        model.arch,
        file_bytes=file_bytes,
        source=f"{model.arch.params_total / 1e9:.2f}B parameters x "
        f"{quant.file_bits_per_weight} bits per weight (a whole {quant.name} file, "
        "llama.cpp's quantize README), split over tensors in proportion to parameters",
    )


def read_model_file(path: str) -> tuple[GGUFReport, Architecture, Weights]:
    """The model at `path` (a GGUF file, or the first of several) as the planner
    needs it: exact tensor bytes over every file. Bad files raise PlanError."""
    try:
        report = inspect_gguf(path)
    except GGUFError as exc:
        raise PlanError(str(exc)) from exc
    if not (report.block_count and report.embedding_length and report.head_count):
        raise PlanError(
            f"{path}: {report.architecture} metadata lacks block_count, embedding_length "
            "or head_count"
        )
    names = {t.name for t in report.tensors}
    arch = Architecture(
        n_layers=report.block_count,
        n_embd=report.embedding_length,
        n_heads=report.head_count,
        n_kv_heads=report.head_count_kv or report.head_count,
        head_dim=report.head_dim,
        n_ff=report.feed_forward_length or 0,
        n_vocab=report.vocab_size or 0,
        context_length_trained=report.context_length or 0,
        n_experts=report.expert_count or 1,
        n_experts_used=report.expert_used_count or 1,
        tied_embeddings="output.weight" not in names,
    )
    files = len(report.files)
    weights = weights_from_tensors(
        arch,
        ((t.name, t.n_bytes) for t in report.tensors),
        source="exact tensor bytes read from the model's GGUF file"
        + (f"s ({files} files)" if files > 1 else ""),
    )
    return report, arch, weights


def make_report(
    *,
    gpu: str,
    model: str,
    quant: str | None = None,
    n_ctx: int | None = None,
    kv: str = "f16",
    flash_attn: bool | None = None,
    host: str = catalog.DEFAULT_HOST,
    users: int | None = None,
) -> Report:
    """Plan `model` on `gpu`. `model` is a catalog name (with `quant`), a registered
    model's name or the path of a GGUF file, or of the first of its files (whose
    own tensors are used). `users`: people at once (None: the planner suggests)."""
    device = resolve_device(gpu)
    host_device = resolve_host(host)
    if kv not in KV_TYPES:
        raise PlanError(f"unknown KV cache type {kv!r}; valid: {', '.join(KV_TYPES)}")
    model = (model or "").strip()
    if not model:
        raise PlanError(f"name a model: {_model_choices()}")

    path: str | None = None
    files: list[str] = []
    arch: Architecture
    # A registered model may share a catalog model's name (smollm2-135m, the default
    # model; mixtral-8x22b): a quantization asks for the catalog entry, none for the
    # registered model's own files.
    in_catalog = model.lower() in catalog.MODELS
    registered = None if in_catalog and quant else _registered(model)
    if in_catalog and registered is None:
        entry = catalog.MODELS[model.lower()]
        quant_type = resolve_quant(quant)
        arch, weights = entry.arch, _catalog_weights(entry, quant_type)
        label, quant_name, source_kind = entry.label, quant_type.name, "catalog"
        rule = None
        if quant_type.rule_of_thumb_bytes_per_param:
            params = entry.params_for_rule_of_thumb
            rule_bytes = round(params * quant_type.rule_of_thumb_bytes_per_param)
            rule = RuleOfThumb(
                bytes_per_param=quant_type.rule_of_thumb_bytes_per_param,
                params=params,
                weights_bytes=rule_bytes,
                real_weights_bytes=weights.file_bytes,
                headroom_bytes=device.memory_bytes - rule_bytes,
            )
        claim = catalog.CLAIMS.get((entry.name, quant_type.name, device.name))
    else:
        if registered is not None:
            path = registered.path
        elif model.endswith(".gguf") or os.sep in model or Path(model).is_file():
            path = model
        else:
            raise PlanError(f"unknown model {model!r}; valid: {_model_choices()}")
        if quant:
            raise PlanError(
                "--quant applies to catalog models only; a GGUF file is planned from its "
                "own tensors"
            )
        gguf, arch, weights = read_model_file(path)
        files = gguf.files
        label = registered.name if registered else gguf.name or Path(path).stem
        quant_name = gguf.file_type
        source_kind = "registered" if registered else "file"
        rule, claim = None, None

    if n_ctx is None:
        n_ctx = registered.n_ctx if registered else arch.context_length_trained
    if not 1 <= n_ctx <= MAX_CONTEXT_TOKENS:
        raise PlanError(f"the context must be between 1 and {MAX_CONTEXT_TOKENS} tokens")

    comparisons: list[Comparison] = []
    efficiency = prompt_efficiency = None
    if registered is not None:
        comparisons = compare(
            registered,
            weights=weights,
            arch=arch,
            gpu=device if device.kind == "gpu" else None,
            host=device if device.kind == "cpu" else host_device,
        )
        for comparison in comparisons:
            if comparison.device.kind == device.kind:
                efficiency = comparison.calibrated
                prompt_efficiency = comparison.calibrated_prompt

    result = plan(
        weights=weights,
        arch=arch,
        device=device,
        n_ctx=n_ctx,
        kv_type=kv,
        flash_attn=flash_attn,
        host=host_device,
        decode_efficiency=efficiency,
        prompt_efficiency=prompt_efficiency,
    )
    return Report(
        plan=result,
        model_label=label,
        quant=quant_name,
        source_kind=source_kind,
        path=path,
        files=files,
        registered_name=registered.name if registered else None,
        rule_of_thumb=rule,
        claim=claim,
        comparisons=comparisons,
        concurrency=concurrency(
            result,
            users=users,
            compute_efficiency=result.prompt_efficiency.factor
            if result.prompt_efficiency
            else None,
        ),
    )


FLASH_ATTN_MODES = {"auto": None, "on": True, "off": False}


def suggested_n_parallel(*, gpu: str, model: str, quant: str, options: dict) -> int:
    """The sequences a catalog model on a GPU should decode together, with these
    load options (n_ctx, type_k and type_v, flash_attn, as LanguageModel has them):
    the suggested people at once plus the job sequence. The registry's presets take
    their n_parallel from here (apps.py)."""
    if options.get("type_k", "f16") != options.get("type_v", "f16"):
        raise PlanError("the planner plans one KV cache type for K and V")
    report = make_report(
        gpu=gpu,
        model=model,
        quant=quant,
        n_ctx=options.get("n_ctx"),
        kv=options.get("type_k", "f16"),
        flash_attn=FLASH_ATTN_MODES[options.get("flash_attn", "auto")],
    )
    if report.concurrency is None:
        raise PlanError(f"{model} {quant} does not fit {gpu} with room for a KV cache")
    return report.concurrency.n_parallel
