"""The planner's arithmetic: bytes, bandwidth and FLOPs, with no Django and no I/O.

Every figure is a plain number with its unit in its name. Sizes are bytes. What the
planner shows is decimal (GB = 10^9 bytes, kB = 10^3; present.py); the binary
constants here (GIB, MIB, KIB) only state quantities that are binary by nature, such
as a GPU's 81,920 MiB. Each estimate that is not exact arithmetic carries its
assumption in `Plan.assumptions`, in words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

KIB = 1024
MIB = 1024**2
GIB = 1024**3
KB = 10**3
MB = 10**6
GB = 10**9

# Expert FFN tensors: merged ("blk.3.ffn_up_exps.weight") or one per expert, as older
# Mixtral conversions store them ("blk.3.ffn_up.5.weight").
EXPERT_TENSOR = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)(_exps|\.\d+)\.")
LAYER_TENSOR = re.compile(r"^blk\.\d+\.")

# Bytes per cached value for each llama.cpp KV cache type: f16 is 2 bytes; q8_0 stores
# 32 values in 34 bytes (8.5 bits), q4_0 32 values in 18 bytes (4.5 bits).
KV_TYPES: dict[str, tuple[int, int]] = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}

# llama.cpp's default physical batch (n_ubatch): the compute buffer is sized for it.
DEFAULT_N_UBATCH = 512
# Context sizes are searched in these steps (llama.cpp pads the KV cache to 256).
CONTEXT_STEP_TOKENS = 256
# Below this much free memory a plan that fits on paper is called "tight": allocator
# fragmentation, a second process or a larger batch can push it over.
SAFETY_MARGIN_FRACTION = 0.05
# CUDA context, cuBLAS workspace and memory the driver keeps back, per process.
GPU_RUNTIME_OVERHEAD_BYTES = 1 * GIB

DEFAULT_DECODE_EFFICIENCY = {"gpu": 0.6, "cpu": 0.5}
DEFAULT_PROMPT_EFFICIENCY = 0.3

FITS = "fits"
TIGHT = "tight"
DOES_NOT_FIT = "does not fit"


class PlanError(ValueError):
    """Bad planner input; the message says what is wrong and what would be valid."""


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer that the planner needs.

    A dense model has n_experts 1 and n_experts_used 1; a mixture of experts has
    n_experts FFNs per layer of which n_experts_used run for each token.
    """

    n_layers: int
    n_embd: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ff: int
    n_vocab: int
    context_length_trained: int
    n_experts: int = 1
    n_experts_used: int = 1
    tied_embeddings: bool = False

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @property
    def attention_params_per_layer(self) -> int:
        q_and_o = 2 * self.n_embd * self.n_heads * self.head_dim
        k_and_v = 2 * self.n_embd * self.n_kv_heads * self.head_dim
        return q_and_o + k_and_v

    @property
    def expert_params(self) -> int:
        """One SwiGLU feed-forward network: gate, up and down matrices."""
        return 3 * self.n_embd * self.n_ff

    @property
    def layer_params(self) -> int:
        router = self.n_embd * self.n_experts if self.is_moe else 0
        norms = 2 * self.n_embd
        return (
            self.attention_params_per_layer + self.n_experts * self.expert_params + router + norms
        )

    @property
    def layer_params_active(self) -> int:
        """Parameters of one layer that one token reads: only the experts used."""
        unused = (self.n_experts - self.n_experts_used) * self.expert_params
        return self.layer_params - unused

    @property
    def embedding_params(self) -> int:
        return self.n_vocab * self.n_embd

    @property
    def output_params(self) -> int:
        """The output head (a copy of the embedding when tied) and the final norm."""
        return self.embedding_params + self.n_embd

    @property
    def params_total(self) -> int:
        head = self.n_embd if self.tied_embeddings else self.output_params
        return self.embedding_params + self.n_layers * self.layer_params + head

    @property
    def params_active(self) -> int:
        """Parameters read per generated token: active layers and the output head
        (the embedding lookup reads one row, which we count as nothing)."""
        return self.n_layers * self.layer_params_active + self.output_params


@dataclass(frozen=True)
class Weights:
    """Where the weight bytes are, as llama.cpp places them.

    llama.cpp keeps the token embedding in host memory even with every layer on the
    GPU (the lookup reads one row per token); a tied output head is a second copy of
    it on the GPU. `file_bytes` is every tensor of the model, in however many files.
    `expert_bytes` is the part of `layers_bytes` in expert FFNs (0 for a dense model).
    """

    file_bytes: int
    token_embedding_bytes: int
    output_bytes: int
    layers_bytes: int
    layers_read_per_token_bytes: int
    output_read_per_token_bytes: int
    n_layers: int
    source: str
    expert_bytes: int = 0

    @property
    def gpu_bytes(self) -> int:
        """Weights in GPU memory with every layer and the output head offloaded."""
        return self.layers_bytes + self.output_bytes

    @property
    def layer_bytes(self) -> float:
        return self.layers_bytes / self.n_layers

    @property
    def layer_read_per_token_bytes(self) -> float:
        return self.layers_read_per_token_bytes / self.n_layers

    @property
    def read_per_token_bytes(self) -> int:
        return self.layers_read_per_token_bytes + self.output_read_per_token_bytes


def weights_from_parameters(arch: Architecture, *, file_bytes: int, source: str) -> Weights:
    """Split a catalog model's file size over its tensors in proportion to parameters.

    The split is an approximation: a real k-quant file keeps some tensors (attention
    V and output, the output head) at more bits than others. Reading a real GGUF file
    gives the exact split instead.
    """
    bytes_per_param = file_bytes / arch.params_total
    embedding_bytes = round(arch.embedding_params * bytes_per_param)
    output_bytes = round(arch.output_params * bytes_per_param)
    layers_bytes = file_bytes - embedding_bytes - (0 if arch.tied_embeddings else output_bytes)
    layers_read = round(layers_bytes * arch.layer_params_active / arch.layer_params)
    experts = arch.n_experts * arch.expert_params if arch.is_moe else 0
    return Weights(
        file_bytes=file_bytes,
        token_embedding_bytes=embedding_bytes,
        output_bytes=output_bytes,
        layers_bytes=layers_bytes,
        layers_read_per_token_bytes=layers_read,
        output_read_per_token_bytes=output_bytes,
        n_layers=arch.n_layers,
        source=source,
        expert_bytes=round(layers_bytes * experts / arch.layer_params),
    )


def weights_from_tensors(
    arch: Architecture, tensors: Iterable[tuple[str, int]], *, source: str
) -> Weights:
    """Exact weight bytes from a model's tensors (name, bytes), every file's.

    The token embedding, the layers (of which the expert FFNs, read for only
    n_experts_used of n_experts per token), and the rest: output head, final norm,
    rope tables. A tied output head is the embedding, read whole per token.
    """
    total = embedding = output = layers = layers_read = experts = 0
    used_fraction = arch.n_experts_used / arch.n_experts
    for name, n_bytes in tensors:
        total += n_bytes
        if name.startswith("token_embd."):
            embedding += n_bytes
        elif LAYER_TENSOR.match(name):
            layers += n_bytes
            if EXPERT_TENSOR.match(name):
                experts += n_bytes
                layers_read += n_bytes * used_fraction
            else:
                layers_read += n_bytes
        else:
            output += n_bytes
    if arch.tied_embeddings:
        output += embedding
    return Weights(
        file_bytes=total,
        token_embedding_bytes=embedding,
        output_bytes=output,
        layers_bytes=layers,
        layers_read_per_token_bytes=round(layers_read),
        output_read_per_token_bytes=output,
        n_layers=arch.n_layers,
        source=source,
        expert_bytes=experts if arch.is_moe else 0,
    )


def kv_bytes_per_token(arch: Architecture, kv_type: str) -> float:
    """K and V, every layer, every KV head: 2 * n_layers * n_kv_heads * head_dim values."""
    if kv_type not in KV_TYPES:
        raise PlanError(f"unknown KV cache type {kv_type!r}; valid: {', '.join(KV_TYPES)}")
    num, den = KV_TYPES[kv_type]
    return 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * num / den


def compute_buffer_bytes(
    arch: Architecture, *, n_ctx: int, flash_attn: bool, n_ubatch: int = DEFAULT_N_UBATCH
) -> int:
    """llama.cpp's scratch memory for one batch, an estimate.

    The graph allocator reuses memory between steps, so the buffer is about the
    largest intermediate plus the residual stream: without flash attention the f32
    attention scores (n_ubatch x n_ctx per head) and their f16 mask, which grow with
    the context; with it, the feed-forward activations or the f32 logits, whichever
    is larger. Checked against the CPU compute buffer llama.cpp reports for SmolLM2
    (tests/test_planner.py); CUDA adds pools of its own that the runtime overhead covers.
    """
    scores = 0 if flash_attn else n_ubatch * n_ctx * (arch.n_heads * 4 + 2)
    ffn = n_ubatch * arch.n_ff * arch.n_experts_used * 2 * 4
    logits = n_ubatch * arch.n_vocab * 4
    residual = n_ubatch * arch.n_embd * 4 * 4
    return max(scores, ffn, logits) + residual


@dataclass(frozen=True)
class Device:
    """What the planner needs to know about a GPU (or a CPU host)."""

    name: str
    label: str
    kind: str  # "gpu" or "cpu"
    memory_bytes: int
    bandwidth_bytes_per_s: float
    fp16_flops_per_s: float | None = None


@dataclass(frozen=True)
class Efficiency:
    """The fraction of a bound that llama.cpp reaches, and where the number came from."""

    factor: float
    source: str


@dataclass(frozen=True)
class LlamaSettings:
    """What to load the model with, as llama.cpp and our LanguageModel fields call it."""

    n_ctx: int
    n_gpu_layers: int  # -1: every layer and the output head
    flash_attn: bool  # what the memory sums assume
    type_k: str
    type_v: str
    n_batch: int = 512
    n_ubatch: int = DEFAULT_N_UBATCH
    # What llama.cpp is told, as the engine tells it (LanguageModel.flash_attn): "on",
    # "off" or "auto" (on where the backend has the kernel: CUDA and the CPU do).
    flash_attn_mode: str = "auto"

    def command_line(self, model_path: str = "MODEL.gguf") -> str:
        ngl = "99" if self.n_gpu_layers < 0 else str(self.n_gpu_layers)
        parts = [f"llama-server -m {model_path} -c {self.n_ctx} -ngl {ngl}"]
        # Always given: llama-server's own default is auto, so "off" must be said.
        parts.append(f"-fa {self.flash_attn_mode}")
        if self.type_k != "f16" or self.type_v != "f16":
            parts.append(f"-ctk {self.type_k} -ctv {self.type_v}")
        parts.append(f"-b {self.n_batch} -ub {self.n_ubatch}")
        return " ".join(parts)


@dataclass(frozen=True)
class Option:
    """One KV cache type and flash attention choice at the requested context."""

    kv_type: str
    flash_attn: bool
    supported: bool
    total_bytes: int
    headroom_bytes: int
    verdict: str
    max_context_tokens: int


@dataclass
class Plan:
    """The answer: does it fit, how much context, how fast. Bytes and tokens/s."""

    device: Device
    weights: Weights
    arch: Architecture
    n_ctx: int
    kv_type: str
    flash_attn: bool
    kv_bytes_per_token: float
    kv_bytes: int
    compute_buffer_bytes: int
    runtime_overhead_bytes: int
    total_bytes: int
    headroom_bytes: int
    verdict: str
    max_context_tokens: int
    max_context_limited_by: str
    n_gpu_layers: int
    offload_slowdown: float | None
    decode_bound_tokens_per_s: float
    decode_bound_empty_tokens_per_s: float
    decode_efficiency: Efficiency
    decode_estimate_tokens_per_s: float
    prompt_efficiency: Efficiency | None
    prompt_estimate_tokens_per_s: float | None
    full_prompt_seconds: float | None
    settings: LlamaSettings
    options: list[Option] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.verdict != DOES_NOT_FIT

    def as_json(self) -> dict:
        data = asdict(self)
        data["fits"] = self.fits
        data["weights"]["gpu_bytes"] = self.weights.gpu_bytes
        data["weights"]["read_per_token_bytes"] = self.weights.read_per_token_bytes
        data["arch"]["params_total"] = self.arch.params_total
        data["arch"]["params_active"] = self.arch.params_active
        data["settings"]["command_line"] = self.settings.command_line()
        return data


def memory_needed_bytes(
    weights: Weights,
    arch: Architecture,
    device: Device,
    *,
    n_ctx: int,
    kv_type: str,
    flash_attn: bool,
) -> tuple[int, int, int, int]:
    """(weights, KV cache, compute buffer, runtime overhead) with everything on the device."""
    kv = math.ceil(kv_bytes_per_token(arch, kv_type) * n_ctx)
    compute = compute_buffer_bytes(arch, n_ctx=n_ctx, flash_attn=flash_attn)
    if device.kind == "gpu":
        return weights.gpu_bytes, kv, compute, GPU_RUNTIME_OVERHEAD_BYTES
    # On a CPU everything is in host memory once (the file is memory-mapped).
    return weights.file_bytes, kv, compute, 0


def verdict_for(total_bytes: int, memory_bytes: int) -> str:
    if total_bytes > memory_bytes:
        return DOES_NOT_FIT
    if memory_bytes - total_bytes < SAFETY_MARGIN_FRACTION * memory_bytes:
        return TIGHT
    return FITS


def max_context_tokens(
    weights: Weights, arch: Architecture, device: Device, *, kv_type: str, flash_attn: bool
) -> int:
    """The largest context, in steps of 256 tokens, whose total fits the memory.

    It is not capped at the trained context; the caller says which limit binds.
    """

    def fits(n_ctx: int) -> bool:
        parts = memory_needed_bytes(
            weights, arch, device, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn
        )
        return sum(parts) <= device.memory_bytes

    if not fits(CONTEXT_STEP_TOKENS):
        return 0
    low, high = 1, 2
    while fits(high * CONTEXT_STEP_TOKENS) and high < 2**20:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid * CONTEXT_STEP_TOKENS):
            low = mid
        else:
            high = mid
    return low * CONTEXT_STEP_TOKENS


def decode_bound_tokens_per_s(
    weights: Weights, arch: Architecture, *, bandwidth_bytes_per_s: float, kv_per_token, n_ctx
) -> float:
    """Each generated token reads the active weights once and the whole KV cache so far."""
    read = weights.read_per_token_bytes + kv_per_token * n_ctx
    return bandwidth_bytes_per_s / read


def prompt_flops_per_token(arch: Architecture, n_ctx: int) -> float:
    """2 FLOPs per active weight, plus attention: QK^T and AV over, on average, half
    of a causal prompt of n_ctx tokens (2 * 2 * n_layers * n_heads * head_dim * n_ctx/2)."""
    attention = 2 * arch.n_layers * arch.n_heads * arch.head_dim * n_ctx
    return 2 * arch.params_active + attention


def _offload(
    weights: Weights,
    arch: Architecture,
    device: Device,
    host: Device,
    *,
    n_ctx: int,
    kv_type: str,
    flash_attn: bool,
    efficiency: float,
    host_efficiency: float,
) -> tuple[int, float | None, float]:
    """(n_gpu_layers, slowdown, decode tokens/s) when not every layer fits the GPU.

    Layers that do not fit run on the CPU, with their KV cache, at host bandwidth; the
    output head stays on the CPU too. The slowdown compares that with the time the
    same token would take with every layer on the GPU.
    """
    kv_layer = kv_bytes_per_token(arch, kv_type) * n_ctx / arch.n_layers
    free = (
        device.memory_bytes
        - GPU_RUNTIME_OVERHEAD_BYTES
        - compute_buffer_bytes(arch, n_ctx=n_ctx, flash_attn=flash_attn)
    )
    per_layer = weights.layer_bytes + kv_layer
    n_gpu = max(0, min(arch.n_layers, math.floor(free / per_layer)))
    read_layer = weights.layer_read_per_token_bytes + kv_layer
    gpu_s = n_gpu * read_layer / (device.bandwidth_bytes_per_s * efficiency)
    cpu_read = (arch.n_layers - n_gpu) * read_layer + weights.output_read_per_token_bytes
    cpu_s = cpu_read / (host.bandwidth_bytes_per_s * host_efficiency)
    all_gpu_s = (arch.n_layers * read_layer + weights.output_read_per_token_bytes) / (
        device.bandwidth_bytes_per_s * efficiency
    )
    return n_gpu, (gpu_s + cpu_s) / all_gpu_s, 1 / (gpu_s + cpu_s)


def plan(
    *,
    weights: Weights,
    arch: Architecture,
    device: Device,
    n_ctx: int,
    kv_type: str = "f16",
    flash_attn: bool | None = None,
    host: Device | None = None,
    decode_efficiency: Efficiency | None = None,
    prompt_efficiency: Efficiency | None = None,
) -> Plan:
    """Plan one model on one device at one context length.

    flash_attn None means llama.cpp's "auto", the engine's default: planned on, as
    llama.cpp turns it on wherever the backend has the kernel (CUDA and the CPU do),
    and a quantized V cache needs it.
    `host` is the CPU side for layers that do not fit the GPU. Efficiencies default
    to stated assumptions; pass calibrated ones where runs were measured.
    """
    if n_ctx < 1:
        raise PlanError(f"the context must be at least 1 token, not {n_ctx}")
    kv_per_token = kv_bytes_per_token(arch, kv_type)
    flash_attn_mode = "auto" if flash_attn is None else ("on" if flash_attn else "off")
    if flash_attn is None:
        flash_attn = True
    if kv_type != "f16" and not flash_attn:
        raise PlanError(
            f"llama.cpp needs flash attention for a {kv_type} V cache; "
            "turn flash attention on or use an f16 KV cache"
        )
    efficiency = decode_efficiency or Efficiency(
        DEFAULT_DECODE_EFFICIENCY[device.kind],
        f"default assumption for a {device.kind.upper()}, not calibrated",
    )
    host_efficiency = DEFAULT_DECODE_EFFICIENCY["cpu"]

    w_bytes, kv, compute, overhead = memory_needed_bytes(
        weights, arch, device, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn
    )
    total = w_bytes + kv + compute + overhead
    verdict = verdict_for(total, device.memory_bytes)
    max_ctx = max_context_tokens(weights, arch, device, kv_type=kv_type, flash_attn=flash_attn)
    limited_by = "memory"
    if max_ctx >= arch.context_length_trained:
        max_ctx, limited_by = arch.context_length_trained, "trained context"

    bound = decode_bound_tokens_per_s(
        weights,
        arch,
        bandwidth_bytes_per_s=device.bandwidth_bytes_per_s,
        kv_per_token=kv_per_token,
        n_ctx=n_ctx,
    )
    bound_empty = decode_bound_tokens_per_s(
        weights,
        arch,
        bandwidth_bytes_per_s=device.bandwidth_bytes_per_s,
        kv_per_token=kv_per_token,
        n_ctx=0,
    )
    estimate = bound * efficiency.factor

    n_gpu_layers, slowdown = (-1 if device.kind == "gpu" else 0), None
    if device.kind == "gpu" and verdict == DOES_NOT_FIT and host is not None:
        n_gpu_layers, slowdown, estimate = _offload(
            weights,
            arch,
            device,
            host,
            n_ctx=n_ctx,
            kv_type=kv_type,
            flash_attn=flash_attn,
            efficiency=efficiency.factor,
            host_efficiency=host_efficiency,
        )

    prompt_eff = prompt_tps = prompt_s = None
    if device.fp16_flops_per_s:
        prompt_eff = prompt_efficiency or Efficiency(
            DEFAULT_PROMPT_EFFICIENCY, "default assumption, not calibrated"
        )
        prompt_tps = (
            device.fp16_flops_per_s * prompt_eff.factor / prompt_flops_per_token(arch, n_ctx)
        )
        prompt_s = n_ctx / prompt_tps
        if slowdown:
            prompt_tps, prompt_s = prompt_tps / slowdown, prompt_s * slowdown

    options = []
    for option_kv in KV_TYPES:
        for option_fa in (True, False):
            supported = option_kv == "f16" or option_fa
            parts = memory_needed_bytes(
                weights, arch, device, n_ctx=n_ctx, kv_type=option_kv, flash_attn=option_fa
            )
            option_total = sum(parts)
            options.append(
                Option(
                    kv_type=option_kv,
                    flash_attn=option_fa,
                    supported=supported,
                    total_bytes=option_total,
                    headroom_bytes=device.memory_bytes - option_total,
                    verdict=verdict_for(option_total, device.memory_bytes),
                    max_context_tokens=max_context_tokens(
                        weights, arch, device, kv_type=option_kv, flash_attn=option_fa
                    ),
                )
            )

    return Plan(
        device=device,
        weights=weights,
        arch=arch,
        n_ctx=n_ctx,
        kv_type=kv_type,
        flash_attn=flash_attn,
        kv_bytes_per_token=kv_per_token,
        kv_bytes=kv,
        compute_buffer_bytes=compute,
        runtime_overhead_bytes=overhead,
        total_bytes=total,
        headroom_bytes=device.memory_bytes - total,
        verdict=verdict,
        max_context_tokens=max_ctx,
        max_context_limited_by=limited_by,
        n_gpu_layers=n_gpu_layers,
        offload_slowdown=slowdown,
        decode_bound_tokens_per_s=bound,
        decode_bound_empty_tokens_per_s=bound_empty,
        decode_efficiency=efficiency,
        decode_estimate_tokens_per_s=estimate,
        prompt_efficiency=prompt_eff,
        prompt_estimate_tokens_per_s=prompt_tps,
        full_prompt_seconds=prompt_s,
        settings=LlamaSettings(
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            flash_attn=flash_attn,
            type_k=kv_type,
            type_v=kv_type,
            flash_attn_mode=flash_attn_mode,
        ),
        options=options,
        assumptions=_assumptions(device, weights, efficiency, prompt_eff, host),
    )


def _assumptions(device, weights, efficiency, prompt_eff, host) -> list[str]:
    lines = [
        "Sizes are decimal: 1 GB = 10^9 bytes, 1 MB = 10^6, 1 kB = 10^3 (so a card sold "
        'as "80GB" holds 85.9 GB).',
        f"Weights: {weights.source}.",
    ]
    if device.kind == "gpu":
        lines.append(
            f"Runtime overhead {GPU_RUNTIME_OVERHEAD_BYTES / GB:.2f} GB: CUDA context, "
            "cuBLAS workspace and memory the driver keeps back (an estimate; "
            "compare with the measured process peak)."
        )
        lines.append(
            "The token embedding stays in host memory (llama.cpp reads one row per token "
            "on the CPU); a tied output head is a second copy on the GPU."
        )
    lines.append(
        f"Compute buffer for a {DEFAULT_N_UBATCH}-token batch: the largest of the f32 "
        "attention scores (without flash attention), the feed-forward activations and "
        "the logits, plus the residual stream (an estimate)."
    )
    lines.append(
        f'"Tight" means it fits with less than {SAFETY_MARGIN_FRACTION:.0%} of memory free.'
    )
    lines.append(
        "Decode bound: memory bandwidth / bytes read per token (active weights, for a "
        "mixture of experts only the experts used, plus the KV cache at that context)."
    )
    lines.append(f"Decode efficiency {efficiency.factor:.2f}: {efficiency.source}.")
    if prompt_eff:
        lines.append(
            f"Prompt processing: dense FP16 tensor throughput x {prompt_eff.factor:.2f} "
            f"({prompt_eff.source}) / (2 FLOPs per active weight + attention FLOPs)."
        )
    if host is not None and device.kind == "gpu":
        lines.append(
            f"Layers that do not fit the GPU run on the host ({host.label}, "
            f"{host.bandwidth_bytes_per_s / GB:.0f} GB/s, efficiency "
            f"{DEFAULT_DECODE_EFFICIENCY['cpu']:.2f})."
        )
    return lines
