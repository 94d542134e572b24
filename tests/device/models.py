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
