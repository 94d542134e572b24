"""The models a device check loads, small enough to travel.

The embedded model's file (97 MB) cannot travel beside a CUDA build of llama.cpp
within the 64 MiB a device run takes. What travels is its *skeleton*: every
metadata key of the real file (architecture, tokenizer, chat template) and the
name, shape and type of every tensor, in a GGUF of about 2 MB. On the device,
`from_skeleton` writes a file with the same keys and tensors of the same shapes
and quantization types, filled with random weights: llama.cpp loads, offloads and
computes it exactly as it would the real SmolLM2 (same bytes per token, same
kernels), and only the text it writes is noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TENSORS_KEY = "devicecheck.tensors"  # JSON: [[name, ggml shape, type name], ...]


def _copy_fields(reader, writer, skip=()) -> None:
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip or key == "general.architecture":
            continue
        main = field.types[0]
        sub = field.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main, sub)


def write_skeleton(model_path: str | Path, out: str | Path) -> Path:
    """The metadata and tensor list of `model_path`, without the tensors' data."""
    from gguf import GGUFReader, GGUFWriter

    reader = GGUFReader(str(model_path))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(out), arch=arch)
    _copy_fields(reader, writer)
    tensors = [[t.name, [int(n) for n in t.shape], t.tensor_type.name] for t in reader.tensors]
    writer.add_string(TENSORS_KEY, json.dumps(tensors))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)


def from_skeleton(skeleton: str | Path, out: str | Path, seed: int = 0) -> Path:
    """A loadable model with the skeleton's keys and tensor shapes and types, and
    random weights (norms 1, matrices N(0, 0.02), quantized to the original type)."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import quantize

    reader = GGUFReader(str(skeleton))
    arch = reader.fields["general.architecture"].contents()
    tensors = json.loads(reader.fields[TENSORS_KEY].contents())
    writer = GGUFWriter(str(out), arch=arch)
    _copy_fields(reader, writer, skip={TENSORS_KEY})
    rng = np.random.default_rng(seed)
    for name, ggml_shape, type_name in tensors:
        qtype = GGMLQuantizationType[type_name]
        shape = tuple(reversed(ggml_shape))  # numpy order
        if len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)
        else:
            data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(name, quantize(data, qtype))
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)


# An 8B-class dense model's shape (Llama 3 8B's layers, SmolLM2's vocabulary): big
# enough that reading the weights, not the Python around a step, sets a GPU's speed.
LARGE = {"n_layer": 32, "n_embd": 4096, "n_ff": 14336, "n_head": 32, "n_head_kv": 8}


def llama_shaped(skeleton: str | Path, out: str | Path, seed: int = 0, **shape) -> Path:
    """An F16 llama-architecture model of `shape` (LARGE by default) with the
    skeleton's tokenizer. Every layer holds the same random matrices (one array per
    shape, written once per layer): the speed is a model's of that size, and writing
    15 GB takes seconds, not the minutes that random data per tensor would."""
    from gguf import GGUFReader, GGUFWriter

    shape = LARGE | shape
    n_embd, n_ff, n_layer = shape["n_embd"], shape["n_ff"], shape["n_layer"]
    head_dim = n_embd // shape["n_head"]
    kv = shape["n_head_kv"] * head_dim
    reader = GGUFReader(str(skeleton))
    tokenizer_keys = {k for k in reader.fields if k.startswith("tokenizer.")}
    writer = GGUFWriter(str(out), arch="llama")
    skip = {k for k in reader.fields if k not in tokenizer_keys} | {TENSORS_KEY}
    _copy_fields(reader, writer, skip=skip)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    writer.add_name("llama-8b-shaped-random")
    writer.add_context_length(8192)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(shape["n_head"])
    writer.add_head_count_kv(shape["n_head_kv"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    rng = np.random.default_rng(seed)
    arrays: dict[tuple, np.ndarray] = {}

    def matrix(*dims: int) -> np.ndarray:
        if dims not in arrays:
            arrays[dims] = (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)
        return arrays[dims]

    norm = np.ones(n_embd, dtype=np.float32)
    writer.add_tensor("token_embd.weight", matrix(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", norm)
    writer.add_tensor("output.weight", matrix(n_vocab, n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm)
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)
