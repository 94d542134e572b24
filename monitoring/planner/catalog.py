"""What the planner knows without a file: GPUs, hosts, models and quantization types.

Data, not code. Each entry says where its numbers come from, so that a reader can
check them and a maintainer can add a card or a model by adding one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .compute import GB, MIB, Architecture, Device

# GPU memory is what nvidia-smi reports as the card's total (ECC on where the card
# has it); bandwidth and dense FP16 tensor throughput (no sparsity; FP32 accumulate
# on GeForce cards) are from NVIDIA's data sheets.
GPUS: dict[str, Device] = {
    d.name: d
    for d in [
        Device("a100-40gb", "NVIDIA A100 40GB (SXM4)", "gpu", 40960 * MIB, 1555 * GB, 312e12),
        Device("a100-80gb", "NVIDIA A100 80GB (SXM4)", "gpu", 81920 * MIB, 2039 * GB, 312e12),
        Device("h100-pcie", "NVIDIA H100 PCIe 80GB", "gpu", 81559 * MIB, 2000 * GB, 756e12),
        Device("h100-sxm", "NVIDIA H100 SXM5 80GB", "gpu", 81559 * MIB, 3350 * GB, 989e12),
        Device("h200", "NVIDIA H200 141GB (SXM)", "gpu", 143771 * MIB, 4800 * GB, 989e12),
        Device("l40s", "NVIDIA L40S 48GB", "gpu", 46068 * MIB, 864 * GB, 362e12),
        Device("l4", "NVIDIA L4 24GB", "gpu", 23034 * MIB, 300 * GB, 121e12),
        Device("a10", "NVIDIA A10 24GB", "gpu", 23028 * MIB, 600 * GB, 125e12),
        Device("rtx-3090", "NVIDIA GeForce RTX 3090 24GB", "gpu", 24576 * MIB, 936 * GB, 71e12),
        Device("rtx-4090", "NVIDIA GeForce RTX 4090 24GB", "gpu", 24564 * MIB, 1008 * GB, 165e12),
    ]
}

# CPU hosts, for CPU-only runs and for the layers that do not fit a GPU. Bandwidth is
# the theoretical peak of the memory channels (channels x 8 bytes x transfer rate).
# Their memory is this machine's RAM, filled in when a plan is made.
HOSTS: dict[str, Device] = {
    d.name: d
    for d in [
        Device("cpu-ddr4-2ch", "CPU, 2 channels DDR4-3200", "cpu", 0, 51.2 * GB),
        Device("cpu-ddr5-2ch", "CPU, 2 channels DDR5-5600", "cpu", 0, 89.6 * GB),
        Device("cpu-ddr4-8ch", "Server CPU, 8 channels DDR4-3200", "cpu", 0, 204.8 * GB),
        Device("cpu-ddr5-12ch", "Server CPU, 12 channels DDR5-4800", "cpu", 0, 460.8 * GB),
    ]
}
# A100 servers are typically 8-channel DDR4 machines.
DEFAULT_HOST = "cpu-ddr4-8ch"


@dataclass(frozen=True)
class QuantType:
    """A llama.cpp file type (a "quantization mix" for the k-quants).

    block_bits_per_weight: the main tensor type's storage (ggml's block size and
    bytes, exact). file_bits_per_weight: a whole real file, which keeps some tensors
    at more bits; from llama.cpp's quantize README where it publishes one (k-quants:
    the Llama 2 70B table, the nearest to the large models we plan; Q8_0 and F16: the
    Llama 3.1 8B table), else the block figure.
    """

    name: str
    block_bits_per_weight: float
    file_bits_per_weight: float
    # The "bytes per parameter" a common rule of thumb uses, where one is quoted.
    rule_of_thumb_bytes_per_param: float | None = None


QUANTS: dict[str, QuantType] = {
    q.name: q
    for q in [
        QuantType("Q2_K", 2.625, 3.40),
        QuantType("Q3_K_S", 3.4375, 3.47),
        QuantType("Q3_K_M", 3.4375, 3.85, rule_of_thumb_bytes_per_param=0.4),
        QuantType("Q3_K_L", 3.4375, 4.19),
        QuantType("Q4_0", 4.5, 4.5),
        QuantType("Q4_1", 5.0, 5.0),
        QuantType("Q4_K_S", 4.5, 4.53),
        QuantType("Q4_K_M", 4.5, 4.80),
        QuantType("Q5_0", 5.5, 5.5),
        QuantType("Q5_1", 6.0, 6.0),
        QuantType("Q5_K_S", 5.5, 5.50),
        QuantType("Q5_K_M", 5.5, 5.65),
        QuantType("Q6_K", 6.5625, 6.56),
        QuantType("Q8_0", 8.5, 8.5008),
        QuantType("F16", 16.0, 16.0005),
    ]
}


@dataclass(frozen=True)
class KnownFile:
    """The size of a real published file, where we know it, and where from."""

    bytes: int
    source: str


@dataclass(frozen=True)
class CatalogModel:
    name: str
    label: str
    arch: Architecture
    source: str
    # The parameter count the model is advertised with (rule-of-thumb estimates use it).
    advertised_params: int | None = None
    known_files: dict[str, KnownFile] = field(default_factory=dict)

    @property
    def params_for_rule_of_thumb(self) -> int:
        return self.advertised_params or self.arch.params_total


MODELS: dict[str, CatalogModel] = {
    m.name: m
    for m in [
        CatalogModel(
            "mixtral-8x22b",
            "Mixtral 8x22B",
            Architecture(
                n_layers=56,
                n_embd=6144,
                n_heads=48,
                n_kv_heads=8,
                head_dim=128,
                n_ff=16384,
                n_vocab=32000,
                context_length_trained=65536,
                n_experts=8,
                n_experts_used=2,
            ),
            "config.json of mistralai/Mixtral-8x22B-v0.1",
            advertised_params=141_000_000_000,
            known_files={
                "Q3_K_M": KnownFile(
                    67_800_000_000,
                    "the size of published Q3_K_M GGUF files of Mixtral-8x22B-v0.1; "
                    "140.6B parameters x 3.85 bits, llama.cpp's Q3_K_M figure for a 70B "
                    "model, gives 67.7 GB",
                )
            },
        ),
        CatalogModel(
            "mixtral-8x7b",
            "Mixtral 8x7B",
            Architecture(
                n_layers=32,
                n_embd=4096,
                n_heads=32,
                n_kv_heads=8,
                head_dim=128,
                n_ff=14336,
                n_vocab=32000,
                context_length_trained=32768,
                n_experts=8,
                n_experts_used=2,
            ),
            "config.json of mistralai/Mixtral-8x7B-v0.1",
        ),
        CatalogModel(
            "llama-3.1-8b",
            "Llama 3.1 8B",
            Architecture(
                n_layers=32,
                n_embd=4096,
                n_heads=32,
                n_kv_heads=8,
                head_dim=128,
                n_ff=14336,
                n_vocab=128256,
                context_length_trained=131072,
            ),
            "config.json of meta-llama/Llama-3.1-8B",
        ),
        CatalogModel(
            "llama-3.1-70b",
            "Llama 3.1 70B",
            Architecture(
                n_layers=80,
                n_embd=8192,
                n_heads=64,
                n_kv_heads=8,
                head_dim=128,
                n_ff=28672,
                n_vocab=128256,
                context_length_trained=131072,
            ),
            "config.json of meta-llama/Llama-3.1-70B",
        ),
        CatalogModel(
            "mistral-7b",
            "Mistral 7B",
            Architecture(
                n_layers=32,
                n_embd=4096,
                n_heads=32,
                n_kv_heads=8,
                head_dim=128,
                n_ff=14336,
                n_vocab=32000,
                context_length_trained=32768,
            ),
            "config.json of mistralai/Mistral-7B-v0.1 (llama.cpp allocates the full "
            "cache; the 4096-token sliding window does not shrink it)",
        ),
        CatalogModel(
            "smollm2-135m",
            "SmolLM2-135M",
            Architecture(
                n_layers=30,
                n_embd=576,
                n_heads=9,
                n_kv_heads=3,
                head_dim=64,
                n_ff=1536,
                n_vocab=49152,
                context_length_trained=8192,
                tied_embeddings=True,
            ),
            "config.json of HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    ]
}


@dataclass(frozen=True)
class Claim:
    """A figure someone stated without measuring, to set beside the plan."""

    weights_bytes: int
    headroom_bytes: int
    decode_tokens_per_s: float
    source: str


# The hardware note that started the project (reference/a100-mixtral-8x22b-note.txt):
# 141B parameters x 0.4 bytes = 56.4 GB, "23.6 GB of headroom" on 80 GB, "31 tokens/s".
CLAIMS: dict[tuple[str, str, str], Claim] = {
    ("mixtral-8x22b", "Q3_K_M", "a100-80gb"): Claim(
        weights_bytes=56_400_000_000,
        headroom_bytes=23_600_000_000,
        decode_tokens_per_s=31.0,
        source="the hardware note that started the project (0.4 bytes per parameter)",
    )
}


def names(catalog: dict) -> str:
    return ", ".join(catalog)
