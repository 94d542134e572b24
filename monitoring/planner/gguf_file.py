"""Exact weight bytes and architecture numbers of a real GGUF file.

The planner reads the file itself (with the `gguf` library) rather than the
registry's stored inspection, so that a file can be planned before it is registered
and a registered model is planned from the file it really loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .compute import Architecture, PlanError, Weights

# Expert FFN tensors: merged ("blk.3.ffn_up_exps.weight") or one per expert, as older
# Mixtral conversions store them ("blk.3.ffn_up.5.weight").
EXPERT_TENSOR = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)(_exps|\.\d+)\.")
LAYER_TENSOR = re.compile(r"^blk\.\d+\.")


@dataclass(frozen=True)
class GGUFModel:
    path: str
    name: str
    architecture: str
    file_type: str
    arch: Architecture
    weights: Weights
    params_total: int


def _value(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _number(reader, key: str, default=None):
    value = _value(reader, key)
    if value is None:
        return default
    if isinstance(value, list):  # per-layer values (some architectures): plan the largest
        return max(int(v) for v in value) if value else default
    return int(value)


def _file_type_name(code) -> str:
    from gguf.constants import LlamaFileType

    try:
        return LlamaFileType(int(code)).name.removeprefix("MOSTLY_").replace("ALL_", "")
    except (TypeError, ValueError):
        return "unknown"


def read_gguf(path: str | Path) -> GGUFModel:
    """Read a GGUF file's tensors and metadata. Bad files raise PlanError, naming the file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such GGUF file")
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise PlanError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the library raises several types for damaged files
        raise PlanError(f"{path}: damaged or truncated GGUF file ({exc})") from exc

    arch_name = _value(reader, "general.architecture")
    if not arch_name:
        raise PlanError(f"{path}: the file names no architecture")

    def key(suffix: str, default=None):
        return _number(reader, f"{arch_name}.{suffix}", default)

    n_layers = key("block_count")
    n_embd = key("embedding_length")
    n_heads = key("attention.head_count")
    if not (n_layers and n_embd and n_heads):
        raise PlanError(
            f"{path}: {arch_name} metadata lacks block_count, embedding_length or head_count"
        )
    names = [t.name for t in reader.tensors]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else 0)
    arch = Architecture(
        n_layers=n_layers,
        n_embd=n_embd,
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv", n_heads),
        head_dim=key("attention.key_length", n_embd // n_heads),
        n_ff=key("feed_forward_length", 0),
        n_vocab=n_vocab,
        context_length_trained=key("context_length", 0),
        n_experts=key("expert_count", 0) or 1,
        n_experts_used=key("expert_used_count", 0) or 1,
        tied_embeddings="output.weight" not in names,
    )

    embedding = output = layers = layers_read = 0
    used_fraction = arch.n_experts_used / arch.n_experts
    for tensor in reader.tensors:
        n_bytes = int(tensor.n_bytes)
        if tensor.name.startswith("token_embd."):
            embedding += n_bytes
        elif LAYER_TENSOR.match(tensor.name):
            layers += n_bytes
            layers_read += n_bytes * used_fraction if EXPERT_TENSOR.match(tensor.name) else n_bytes
        else:  # output head, final norm, rope tables
            output += n_bytes
    if arch.tied_embeddings:
        output += embedding  # the output head is the embedding, read whole per token

    return GGUFModel(
        path=str(path),
        name=str(_value(reader, "general.name") or path.stem),
        architecture=arch_name,
        file_type=_file_type_name(_value(reader, "general.file_type")),
        arch=arch,
        weights=Weights(
            file_bytes=sum(int(t.n_bytes) for t in reader.tensors),
            token_embedding_bytes=embedding,
            output_bytes=output,
            layers_bytes=layers,
            layers_read_per_token_bytes=round(layers_read),
            output_read_per_token_bytes=output,
            n_layers=n_layers,
            source="exact tensor bytes read from the GGUF file",
        ),
        params_total=sum(int(t.n_elements) for t in reader.tensors),
    )
