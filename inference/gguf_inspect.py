"""What a GGUF file is, read with the `gguf` library before any worker loads it.

Everything here comes from the file's header and tensor table; no weights are read,
so inspecting a 68 GB Mixtral takes about as long as inspecting a 100 MB model.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """The file cannot be served; the message names the file and what is wrong."""


@dataclass
class GGUFReport:
    """The facts about a model file that the registry stores (LanguageModel.inspection)."""

    path: str
    architecture: str
    parameter_count: int
    tensor_bytes: int
    file_bytes: int
    file_type: str
    tensor_types: dict[str, int]
    block_count: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    head_dim: int | None
    context_length: int | None
    expert_count: int | None
    expert_used_count: int | None
    vocab_size: int | None
    has_chat_template: bool
    name: str = ""
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return asdict(self)

    @property
    def kv_bytes_per_token_f16(self) -> int | None:
        """K and V for one token in every layer at f16 (2 bytes per element)."""
        if not (self.block_count and self.head_count_kv and self.head_dim):
            return None
        return 2 * self.block_count * self.head_count_kv * self.head_dim * 2


def _value(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def _int(value) -> int | None:
    """A count from the header; per-layer arrays (some architectures) give their max."""
    if value is None:
        return None
    if isinstance(value, list):
        return max((int(v) for v in value), default=None)
    return int(value)


def _file_type_name(value) -> str:
    from gguf import LlamaFileType

    if value is None:
        return ""
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"unknown ({value})"


def inspect_gguf(path: str | Path) -> GGUFReport:
    """Read the file's header and tensor table. Raises GGUFError naming the file and
    the problem: missing, not a file, not GGUF, truncated or damaged.

    The `gguf` library parses every header field, the vocabulary's tens of thousands
    of strings included (seconds for SmolLM2), so a report is kept per process for
    as long as the file's size and modification time stay the same."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a file")
    stat = path.stat()
    return copy.deepcopy(_inspect(path, stat.st_size, stat.st_mtime_ns))


@lru_cache(maxsize=16)
def _inspect(path: Path, file_bytes: int, _mtime_ns: int) -> GGUFReport:
    from gguf import GGUFReader

    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the library raises several types for damaged files
        raise GGUFError(f"{path}: damaged or truncated GGUF file ({exc})") from exc

    architecture = _value(reader, "general.architecture") or ""
    if not architecture:
        raise GGUFError(f"{path}: the GGUF file names no architecture")
    if not reader.tensors:
        raise GGUFError(f"{path}: the GGUF file holds no tensors (a vocabulary-only file?)")
    end_of_data = max(t.data_offset + t.n_bytes for t in reader.tensors)
    if end_of_data > file_bytes:
        raise GGUFError(
            f"{path}: truncated: the tensors need {end_of_data:,} bytes "
            f"but the file has {file_bytes:,}"
        )

    def arch(key: str):
        return _value(reader, f"{architecture}.{key}")

    embedding_length = _int(arch("embedding_length"))
    head_count = _int(arch("attention.head_count"))
    head_dim = _int(arch("attention.key_length"))
    if head_dim is None and embedding_length and head_count:
        head_dim = embedding_length // head_count
    head_count_kv = _int(arch("attention.head_count_kv")) or head_count
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = _int(arch("vocab_size")) or (len(tokens.data) if tokens else None)

    return GGUFReport(
        path=str(path),
        name=str(_value(reader, "general.name") or ""),
        architecture=architecture,
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        file_bytes=file_bytes,
        file_type=_file_type_name(_value(reader, "general.file_type")),
        tensor_types=dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
        block_count=_int(arch("block_count")),
        embedding_length=embedding_length,
        head_count=head_count,
        head_count_kv=head_count_kv,
        head_dim=head_dim,
        context_length=_int(arch("context_length")),
        expert_count=_int(arch("expert_count")),
        expert_used_count=_int(arch("expert_used_count")),
        vocab_size=vocab_size,
        has_chat_template=bool(_value(reader, "tokenizer.chat_template")),
    )
