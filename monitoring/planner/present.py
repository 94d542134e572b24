"""A plan in words and rounded numbers, the same on the page and in the terminal.

One convention for sizes: decimal units (GB = 10^9 bytes, MB = 10^6, kB = 10^3), the
units model files are published in. A GPU's memory, binary by nature (an A100 80GB
has 81,920 MiB), is shown in GB too: 85.9 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

from .compute import DOES_NOT_FIT, FITS, GB, KB, MB
from .concurrency import CHAT_CONTEXT_TOKENS
from .report import Report


def gb(n_bytes: float | None) -> str:
    """A size in GB, or in MB below one GB."""
    if n_bytes is None:
        return "—"
    if abs(n_bytes) < GB:
        return f"{n_bytes / MB:,.1f} MB"
    return f"{n_bytes / GB:,.1f} GB"


def kb(n_bytes: float) -> str:
    return f"{n_bytes / KB:,.1f} kB"


def tps(tokens_per_s: float | None) -> str:
    return "—" if tokens_per_s is None else f"{tokens_per_s:,.1f} tokens/s"


def tokens(n: float) -> str:
    return f"{n:,.0f} tokens"


@dataclass(frozen=True)
class Row:
    label: str
    value: str
    note: str = ""


@dataclass(frozen=True)
class Section:
    title: str
    rows: list[Row]


def headline(report: Report) -> str:
    p = report.plan
    where = p.device.label
    head = (
        f"{report.model_label} {report.quant} on {where} at {tokens(p.n_ctx)} "
        f"({p.kv_type} KV cache, flash attention {'on' if p.flash_attn else 'off'}): "
        f"{p.verdict}"
    )
    if p.verdict == DOES_NOT_FIT:
        if p.offload_slowdown:
            on_host = p.arch.n_layers - p.n_gpu_layers
            return (
                head + f" with every layer on the GPU; {p.n_gpu_layers} of the "
                f"{p.arch.n_layers} layers fit on the GPU (n_gpu_layers {p.n_gpu_layers}) "
                f"and the other {on_host} run on the host, about "
                f"{p.offload_slowdown:.1f}x slower"
            )
        return head
    return head + f", {gb(p.headroom_bytes)} free"


def sections(report: Report) -> list[Section]:
    p = report.plan
    w = p.weights
    on = "GPU" if p.device.kind == "gpu" else "host"
    files = len(report.files)
    memory = [
        Row(
            f"Weights in {on} memory",
            gb(p.total_bytes - p.kv_bytes - p.compute_buffer_bytes - p.runtime_overhead_bytes),
            f"all the model's tensors {gb(w.file_bytes)}"
            + (f", in {files} files" if files > 1 else "")
            + ("; the token embedding stays in host memory" if p.device.kind == "gpu" else ""),
        ),
        Row(
            "KV cache per token",
            kb(p.kv_bytes_per_token),
            f"{p.kv_type}: 2 x {p.arch.n_layers} layers x {p.arch.n_kv_heads} KV heads x "
            f"{p.arch.head_dim} dims",
        ),
        Row("KV cache at this context", gb(p.kv_bytes), tokens(p.n_ctx)),
        Row("Compute buffer", gb(p.compute_buffer_bytes), "estimate, see assumptions"),
        Row("Runtime overhead", gb(p.runtime_overhead_bytes), "estimate, see assumptions"),
        Row("Total", gb(p.total_bytes)),
        Row(f"{p.device.label} memory", gb(p.device.memory_bytes)),
        Row("Headroom", gb(p.headroom_bytes), p.verdict),
        Row(
            "Largest context that fits",
            tokens(p.max_context_tokens),
            f"limited by the {p.max_context_limited_by}"
            + (
                "; the weights alone do not fit, see offloading"
                if p.max_context_tokens == 0
                else ""
            ),
        ),
    ]
    speed = [
        Row(
            "Decode upper bound",
            tps(p.decode_bound_tokens_per_s),
            f"bandwidth / {gb(w.read_per_token_bytes + p.kv_bytes)} read per token at "
            f"{tokens(p.n_ctx)}; {tps(p.decode_bound_empty_tokens_per_s)} at an empty context"
            + ("; if every layer fitted the GPU" if p.offload_slowdown else ""),
        ),
        Row(
            "Decode estimate",
            tps(p.decode_estimate_tokens_per_s),
            f"efficiency {p.decode_efficiency.factor:.2f} ({p.decode_efficiency.source})"
            + (f"; {p.offload_slowdown:.1f}x slower from offloading" if p.offload_slowdown else ""),
        ),
    ]
    if p.prompt_estimate_tokens_per_s:
        speed.append(
            Row(
                "Prompt processing estimate",
                tps(p.prompt_estimate_tokens_per_s),
                f"efficiency {p.prompt_efficiency.factor:.2f} ({p.prompt_efficiency.source}); "
                f"a full {tokens(p.n_ctx)} prompt takes about {p.full_prompt_seconds:,.0f} s",
            )
        )
    else:
        speed.append(Row("Prompt processing estimate", "—", "not modelled for CPUs"))
    if p.offload_slowdown:
        speed.append(
            Row(
                "Offloading",
                f"{p.n_gpu_layers} of {p.arch.n_layers} layers on the GPU",
                f"the other {p.arch.n_layers - p.n_gpu_layers} layers and the output head on "
                f"the host; about {p.offload_slowdown:.1f}x slower decode",
            )
        )
    s = p.settings
    settings = [
        Row("n_ctx", str(s.n_ctx)),
        Row("n_gpu_layers", str(s.n_gpu_layers), "-1: every layer and the output head"),
        Row(
            "flash_attn",
            s.flash_attn_mode,
            "llama.cpp turns it on where the device has the kernel (planned on)"
            if s.flash_attn_mode == "auto"
            else "",
        ),
        Row("type_k / type_v", f"{s.type_k} / {s.type_v}"),
        Row("n_batch / n_ubatch", f"{s.n_batch} / {s.n_ubatch}"),
    ]
    c = report.concurrency
    command = s.command_line(report.path or "MODEL.gguf")
    if c is not None:
        settings.append(
            Row(
                "n_parallel / job_sequences",
                f"{c.n_parallel} / {c.job_sequences}",
                "sequences in one KV pool (llama.cpp's unified KV cache), of which jobs",
            )
        )
        command += f" -np {c.n_parallel} -kvu"
    settings.append(Row("llama.cpp", command))
    result = [Section("Memory", memory), Section("Speed", speed)]
    if report.rule_of_thumb or report.claim:
        result.append(Section("Rule of thumb vs. the file", rule_rows(report)))
    result.append(Section("llama.cpp settings", settings))
    return result


def rule_rows(report: Report) -> list[Row]:
    p = report.plan
    rows = []
    rule = report.rule_of_thumb
    if rule:
        rows += [
            Row(
                "Rule of thumb",
                gb(rule.weights_bytes),
                f"{rule.params / 1e9:,.1f}B parameters x {rule.bytes_per_param} bytes",
            ),
            Row(
                "The real file",
                gb(rule.real_weights_bytes),
                f"{rule.real_weights_bytes / rule.weights_bytes - 1:+.0%} against the rule",
            ),
        ]
    claim = report.claim
    if claim:
        rows += [
            Row(
                "Claimed headroom",
                gb(claim.headroom_bytes),
                f"{claim.source}; weights only, no KV cache",
            ),
            Row(
                "Real headroom",
                gb(p.headroom_bytes),
                f"weights, {gb(p.kv_bytes)} of {p.kv_type} KV cache at {tokens(p.n_ctx)}, "
                "compute buffer and overhead",
            ),
            Row(
                "Claimed speed",
                tps(claim.decode_tokens_per_s),
                f"{report.claim_fraction_of_bound:.0%} of the {tps(p.decode_bound_tokens_per_s)} "
                f"bound at {tokens(p.n_ctx)} and "
                f"{claim.decode_tokens_per_s / p.decode_bound_empty_tokens_per_s:.0%} of the "
                f"{tps(p.decode_bound_empty_tokens_per_s)} bound at an empty context",
            ),
        ]
    return rows


def concurrency_rows(report: Report) -> list[Row]:
    """How many people at once, at what context, and how fast in all."""
    c, p = report.concurrency, report.plan
    if c is None:
        return [
            Row(
                "People at once",
                "—",
                "the model does not fit the GPU with room for a KV cache; see offloading",
            )
        ]
    plural = "s" if c.users != 1 else ""
    how = (
        f"as many {CHAT_CONTEXT_TOKENS:,}-token chats as half the pool holds; choose "
        "another number with --users (the Users field)"
        if c.users_suggested
        else f"{c.users} user{plural} at once, as asked"
    )
    trained = p.arch.context_length_trained
    job_capped = trained and c.job_context_tokens == trained
    speed = (
        f"{tps(c.per_sequence_decode_tokens_per_s)} for each sequence, every one at its whole "
        f"context; {tps(c.empty.tokens_per_s)} in all at empty contexts; one sequence "
        f"alone at {tokens(c.chat_context_tokens)}: {tps(c.single_tokens_per_s)}"
    )
    if p.arch.is_moe:
        speed += (
            f". {c.n_parallel} tokens at once read {c.full.experts_touched:.1f} of the "
            f"{p.arch.n_experts} experts of each layer, not {c.n_parallel} x "
            f"{p.arch.n_experts_used}: E x (1 - (1 - k/E)^B)"
        )
    if c.full.limited_by == "compute":
        speed += "; at this batch the GPU's compute, not its bandwidth, sets the pace"
    return [
        Row(
            "KV tokens left after the weights and buffers",
            tokens(c.kv_tokens_left),
            f"{gb(c.kv_free_bytes)} free after the weights, compute buffer and runtime "
            f"overhead, at {kb(p.kv_bytes_per_token)} per token ({p.kv_type})",
        ),
        Row(
            "KV pool (n_ctx)",
            tokens(c.pool_tokens),
            "shared by every sequence; "
            + (
                "all that memory holds"
                if c.pool_limited_by == "memory"
                else "the context planned above"
                + (
                    f" (memory would hold {c.kv_tokens_left / c.pool_tokens:.1f}x as much)"
                    if c.kv_tokens_left >= 1.5 * c.pool_tokens
                    else ""
                )
            ),
        ),
        Row(
            "Suggested split" if c.users_suggested else "Split",
            f"{c.users} chat{plural} x {tokens(c.chat_context_tokens)} + "
            f"{c.job_sequences} job x {tokens(c.job_context_tokens)}",
            f"n_parallel {c.n_parallel}, job_sequences {c.job_sequences}; {how}",
        ),
        Row(
            "Context left for one job",
            tokens(c.job_context_tokens),
            "what the chats leave of the pool when each holds its whole context"
            + ("; the trained context caps it" if job_capped else ""),
        ),
        Row(
            f"Aggregate decode at {c.n_parallel} sequences",
            tps(c.aggregate_decode_tokens_per_s),
            speed,
        ),
    ]


def comfortable_options(report: Report) -> str:
    """The KV cache and flash attention choices that fit with room to spare."""
    good = [
        f"{o.kv_type} KV cache with flash attention {'on' if o.flash_attn else 'off'}"
        for o in report.plan.options
        if o.supported and o.verdict == FITS
    ]
    return ", ".join(good) if good else "none"


def option_rows(report: Report) -> list[Row]:
    """Each KV cache type, with and without flash attention, at the planned context."""
    trained = report.plan.arch.context_length_trained
    rows = [Row("Fits with room to spare", comfortable_options(report))]
    for o in report.plan.options:
        name = f"{o.kv_type}, flash attention {'on' if o.flash_attn else 'off'}"
        if not o.supported:
            rows.append(Row(name, "not supported", "llama.cpp needs flash attention for it"))
            continue
        max_ctx = min(o.max_context_tokens, trained) if trained else o.max_context_tokens
        rows.append(
            Row(
                name,
                f"{gb(o.total_bytes)}: {o.verdict}",
                f"headroom {gb(o.headroom_bytes)}; largest context {tokens(max_ctx)}",
            )
        )
    return rows


def measured_rows(report: Report) -> list[Row]:
    rows = []
    for c in report.comparisons:
        kind = "GPU" if c.device.kind == "gpu" else "CPU"
        runs = f"{c.runs} {kind} run{'s' if c.runs != 1 else ''}"
        if c.device.kind == "gpu":
            rows.append(
                Row(
                    f"VRAM ({runs})",
                    f"measured {gb(c.measured_vram_peak_bytes)} peak, "
                    f"predicted {gb(c.predicted_vram_bytes)}",
                    f"process peak (NVML) at n_ctx {c.n_ctx}, compared with {c.device.label}",
                )
            )
        else:
            rows.append(Row(f"VRAM ({runs})", "no GPU measurements"))
            rows.append(
                Row(
                    f"Host memory ({runs})",
                    f"measured {gb(c.measured_rss_peak_bytes)} RSS peak, "
                    f"predicted {gb(c.predicted_host_memory_bytes)}",
                    "RSS counts only the pages of the memory-mapped file that were read",
                )
            )
        rows.append(
            Row(
                f"Decode ({runs})",
                f"measured {tps(c.measured_decode_tokens_per_s)} mean, "
                f"predicted {tps(c.predicted_decode_tokens_per_s)}",
                f"bound {tps(c.predicted_decode_bound_tokens_per_s)} on {c.device.label} at "
                f"{tokens(c.context_used_mean_tokens)} x default efficiency "
                f"{c.default_efficiency:.2f}; calibrated efficiency {c.calibrated.factor:.3f}",
            )
        )
        if c.measured_prompt_tokens_per_s:
            rows.append(
                Row(
                    f"Prompt ({runs})",
                    f"measured {tps(c.measured_prompt_tokens_per_s)} mean",
                    f"calibrated efficiency {c.calibrated_prompt.factor:.3f}"
                    if c.calibrated_prompt
                    else "",
                )
            )
    return rows


def as_text(report: Report) -> str:
    lines = [headline(report), ""]
    groups = [(s.title, s.rows) for s in sections(report)]
    groups.insert(2, ("KV cache options at this context", option_rows(report)))
    groups.insert(3, ("People at once", concurrency_rows(report)))
    if report.registered_name:
        groups.append(
            ("Estimate vs. measured", measured_rows(report) or [Row("Runs", "none recorded")])
        )
    for title, rows in groups:
        lines.append(title)
        width = max(len(r.label) for r in rows)
        for r in rows:
            lines.append(
                f"  {r.label.ljust(width)}  {r.value}" + (f"  ({r.note})" if r.note else "")
            )
        lines.append("")
    lines.append("Assumptions")
    lines += [f"  - {a}" for a in report.plan.assumptions]
    return "\n".join(lines)
