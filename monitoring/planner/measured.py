"""Estimate against measurement: what monitoring recorded for a registered model,
beside what the planner predicts, and the efficiency factor those runs imply.

Calibration: for each finished run with a decode speed, divide the measured decode
tokens/s by the planner's bandwidth bound at that run's context (prompt + completion
tokens) on the device it is compared with; the efficiency is the median of those
ratios (the median, so that one run slowed by a busy machine does not move it).
Prompt processing on a GPU is calibrated the same way against the FLOPs bound.
GPU runs and CPU runs are calibrated separately. RequestMetrics does not say which
GPU model a run used, so GPU runs are compared with the GPU being planned.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .compute import (
    Architecture,
    Device,
    Efficiency,
    Weights,
    decode_bound_tokens_per_s,
    kv_bytes_per_token,
    memory_needed_bytes,
    prompt_flops_per_token,
)


@dataclass(frozen=True)
class Comparison:
    """Runs of one kind (GPU or CPU) of one registered model, beside the prediction."""

    device: Device
    runs: int
    n_ctx: int
    context_used_mean_tokens: float
    measured_decode_tokens_per_s: float
    predicted_decode_bound_tokens_per_s: float
    predicted_decode_tokens_per_s: float
    default_efficiency: float
    calibrated: Efficiency
    # GPU runs: NVML's per-process peak. CPU runs: None ("no GPU measurements").
    measured_vram_peak_bytes: int | None
    predicted_vram_bytes: int | None
    measured_rss_peak_bytes: int | None
    predicted_host_memory_bytes: int | None
    measured_prompt_tokens_per_s: float | None
    # GPU runs only: prompt speed / (FP16 throughput / FLOPs per prompt token).
    calibrated_prompt: Efficiency | None = None


def _runs(language_model):
    from monitoring.models import RequestMetrics

    return list(
        RequestMetrics.objects.filter(
            generation__model=language_model,
            decode_tokens_per_s__isnull=False,
            decode_tokens_per_s__gt=0,
        ).order_by("-created_at")[:500]
    )


def compare(
    language_model, *, weights: Weights, arch: Architecture, gpu: Device, host: Device
) -> list[Comparison]:
    """One Comparison for GPU runs (against `gpu`), one for CPU runs (against `host`);
    none for a kind that has no runs."""
    from .compute import DEFAULT_DECODE_EFFICIENCY

    rows = _runs(language_model)
    kv_per_token = (
        kv_bytes_per_token(arch, language_model.type_k)
        + kv_bytes_per_token(arch, language_model.type_v)
    ) / 2
    result = []
    for kind, device in (("gpu", gpu), ("cpu", host)):
        group = [r for r in rows if (r.gpu_index is not None) == (kind == "gpu")]
        if not group or device is None:
            continue
        ratios = []
        for r in group:
            bound = decode_bound_tokens_per_s(
                weights,
                arch,
                bandwidth_bytes_per_s=device.bandwidth_bytes_per_s,
                kv_per_token=kv_per_token,
                n_ctx=r.context_used,
            )
            ratios.append(r.decode_tokens_per_s / bound)
        context_mean = statistics.fmean(r.context_used for r in group)
        bound_mean = decode_bound_tokens_per_s(
            weights,
            arch,
            bandwidth_bytes_per_s=device.bandwidth_bytes_per_s,
            kv_per_token=kv_per_token,
            n_ctx=context_mean,
        )
        n_ctx = statistics.mode(r.n_ctx for r in group) or language_model.n_ctx
        needed = sum(
            memory_needed_bytes(
                weights,
                arch,
                device,
                n_ctx=n_ctx,
                kv_type=language_model.type_k,
                flash_attn=language_model.flash_attn != "off",
            )
        )
        vram = [r.vram_process_peak_bytes for r in group if r.vram_process_peak_bytes]
        rss = [r.rss_peak_bytes for r in group if r.rss_peak_bytes]
        prompt = [r.prompt_tokens_per_s for r in group if r.prompt_tokens_per_s]
        default = DEFAULT_DECODE_EFFICIENCY[kind]
        calibrated_prompt = None
        prompt_ratios = [
            r.prompt_tokens_per_s
            * prompt_flops_per_token(arch, r.prompt_tokens)
            / device.fp16_flops_per_s
            for r in group
            if r.prompt_tokens_per_s and r.prompt_tokens and device.fp16_flops_per_s
        ]
        if prompt_ratios:
            calibrated_prompt = Efficiency(
                statistics.median(prompt_ratios),
                f"calibrated: median of measured / FLOPs bound over {len(prompt_ratios)} "
                f"GPU run{'s' if len(prompt_ratios) != 1 else ''} of {language_model.name}",
            )
        result.append(
            Comparison(
                device=device,
                runs=len(group),
                n_ctx=n_ctx,
                context_used_mean_tokens=context_mean,
                measured_decode_tokens_per_s=statistics.fmean(r.decode_tokens_per_s for r in group),
                predicted_decode_bound_tokens_per_s=bound_mean,
                predicted_decode_tokens_per_s=bound_mean * default,
                default_efficiency=default,
                calibrated=Efficiency(
                    statistics.median(ratios),
                    f"calibrated: median of measured / bound over {len(group)} "
                    f"{kind.upper()} run{'s' if len(group) != 1 else ''} of "
                    f"{language_model.name}",
                ),
                measured_vram_peak_bytes=max(vram) if vram else None,
                predicted_vram_bytes=needed if kind == "gpu" else None,
                measured_rss_peak_bytes=max(rss) if rss else None,
                predicted_host_memory_bytes=needed if kind == "cpu" else None,
                measured_prompt_tokens_per_s=statistics.fmean(prompt) if prompt else None,
                calibrated_prompt=calibrated_prompt,
            )
        )
    return result
