"""What a GGUF model is, read with the `gguf` library before any worker loads it.

The one reader of model files: the registry, the admin, the worker's pre-load check
and the capacity planner all ask it. Everything comes from the files' headers and
tensor tables; no weights are read, so inspecting a 68 GB Mixtral takes about as
long as inspecting a 100 MB model.

A large model usually comes in several files ("shards"), as llama.cpp's gguf-split
writes them and the Hugging Face Hub publishes them (at most 50 GB per file):
`<prefix>-00001-of-00005.gguf` to `<prefix>-00005-of-00005.gguf`. The first shard
holds the metadata and some tensors; each later one holds more tensors and the
`split.*` keys. llama.cpp is given the first shard and finds the others by that
naming, as this reader does. A report describes the whole model: tensors, bytes
and parameters summed over every file.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

GGUF_MAGIC = b"GGUF"
# llama.cpp's llama_split_path(): "%s-%05d-of-%05d.gguf", numbered from 1.
SHARD_SUFFIX = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"


class GGUFError(ValueError):
    """The model cannot be served; the message names the file and what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str
    n_elements: int
    n_bytes: int


@dataclass
class GGUFReport:
    """The facts about a model that the registry stores (LanguageModel.inspection).

    `path` is the file to give llama.cpp (the first shard of a split model); `files`
    lists every file of the model, the first included. Counts and bytes are totals
    over all of them.
    """

    path: str
    files: list[str]
    architecture: str
    parameter_count: int
    tensor_count: int
    tensor_bytes: int
    file_bytes: int
    file_type: str
    tensor_types: dict[str, int]
    block_count: int | None
    embedding_length: int | None
    feed_forward_length: int | None
    head_count: int | None
    head_count_kv: int | None
    head_dim: int | None
    context_length: int | None
    expert_count: int | None
    expert_used_count: int | None
    vocab_size: int | None
    has_chat_template: bool
    name: str = ""
    # Every tensor of every file, for the planner; not stored with the inspection.
    tensors: list[TensorInfo] = field(default_factory=list, repr=False)

    def as_json(self) -> dict:
        return {f.name: _copy(getattr(self, f.name)) for f in fields(self) if f.name != "tensors"}

    @property
    def kv_bytes_per_token_f16(self) -> int | None:
        """K and V for one token in every layer at f16 (2 bytes per element)."""
        if not (self.block_count and self.head_count_kv and self.head_dim):
            return None
        return 2 * self.block_count * self.head_count_kv * self.head_dim * 2


def _copy(value):
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value


def files_summary(inspection: dict) -> str:
    """The model's size on disk and how many files it is, from a stored inspection:
    "67.8 GB in 5 files". Sizes are decimal (1 GB = 10^9 bytes), as the Hub shows them."""
    file_bytes = inspection.get("file_bytes")
    if not file_bytes:
        return ""
    count = len(inspection.get("files") or [inspection.get("path")])
    size = f"{file_bytes / 1e9:,.1f} GB" if file_bytes >= 1e9 else f"{file_bytes / 1e6:,.1f} MB"
    return f"{size} in {count} file{'s' if count != 1 else ''}"


def shard_paths(first: Path, count: int) -> list[Path]:
    """Every shard's path, given the first's: `<prefix>-00001-of-NNNNN.gguf` onwards."""
    match = SHARD_SUFFIX.search(first.name)
    if not match or int(match.group(1)) != 1 or int(match.group(2)) != count:
        raise GGUFError(
            f"{first}: this is the first of {count} files of a split model, but llama.cpp "
            f"finds the others by their names and this one is not named "
            f"<prefix>-00001-of-{count:05d}.gguf; give the files their published names"
        )
    prefix = first.name[: match.start()]
    return [first.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def inspect_gguf(path: str | Path) -> GGUFReport:
    """Read the model's headers and tensor tables, every shard of a split model.

    Raises GGUFError naming the file and the problem: missing, not a file, not GGUF,
    truncated or damaged; for a split model also a missing shard (naming every
    missing file), a shard from another set, or a later shard given in place of the
    first (naming the first).

    The `gguf` library parses every header field, the vocabulary's tens of thousands
    of strings included (3 s for SmolLM2, at every worker start), so each file's
    header is kept for as long as its path, size and modification time stay the same:
    in the process, and in Django's "gguf" cache for the other processes."""
    path = Path(path)
    first = _header(path)
    count = first.split_count or 1
    if count == 1:
        return _report([first])
    if first.split_no:
        raise GGUFError(_not_the_first_shard(path, first.split_no, count))
    paths = shard_paths(path, count)
    missing = [p for p in paths[1:] if not p.is_file()]
    if missing:
        names = ", ".join(p.name for p in missing)
        raise GGUFError(
            f"{path}: the model is split into {count} files and "
            f"{len(missing)} {'is' if len(missing) == 1 else 'are'} missing from "
            f"{path.parent}: {names}. llama.cpp needs every file; download them all "
            "into the same folder"
        )
    shards = [first] + [_header(p) for p in paths[1:]]
    _check_one_set(shards, count)
    return _report(shards)


def _not_the_first_shard(path: Path, split_no: int, count: int) -> str:
    match = SHARD_SUFFIX.search(path.name)
    if match:
        first = path.with_name(f"{path.name[: match.start()]}-00001-of-{count:05d}.gguf")
        hint = f"give the first one: {first}"
    else:
        hint = "give the first one (the file whose split.no is 0)"
    return (
        f"{path}: this is file {split_no + 1} of {count} of a split model; llama.cpp "
        f"loads a split model from its first file, so {hint}"
    )


def _check_one_set(shards: list[_Header], count: int) -> None:
    """Every shard says it is the one expected at its place, in a set of the same
    size and tensor count as the first's, and no tensor is in two files."""
    first = shards[0]
    for number, shard in enumerate(shards[1:], start=2):
        if shard.split_count is None or shard.split_no is None:
            raise GGUFError(
                f"{shard.path}: not part of {first.path.name}'s set: it is a model of "
                "its own (it has no split keys)"
            )
        if shard.split_count != count or shard.split_no + 1 != number:
            raise GGUFError(
                f"{shard.path}: not part of {first.path.name}'s set: it says it is file "
                f"{shard.split_no + 1} of {shard.split_count}, where file {number} of "
                f"{count} belongs"
            )
        if shard.split_tensors != first.split_tensors:
            raise GGUFError(
                f"{shard.path}: not part of {first.path.name}'s set: it belongs to a "
                f"model of {shard.split_tensors} tensors, {first.path.name} to one of "
                f"{first.split_tensors}"
            )
    seen: dict[str, Path] = {}
    for shard in shards:
        for tensor in shard.tensors:
            if tensor.name in seen:
                raise GGUFError(
                    f"{first.path}: {seen[tensor.name].name} and {shard.path.name} both "
                    f"hold the tensor {tensor.name}, so they are not of one set (the "
                    "same model split another way?); download the files of one set"
                )
            seen[tensor.name] = shard.path
    if first.split_tensors is not None and len(seen) != first.split_tensors:
        raise GGUFError(
            f"{first.path}: the set should hold {first.split_tensors} tensors, but its "
            f"{count} files hold {len(seen)}"
        )


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
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_").replace("ALL_", "")
    except ValueError:
        return f"unknown ({value})"


def _report(shards: list[_Header]) -> GGUFReport:
    first = shards[0]
    meta = first.metadata
    architecture = meta.get("general.architecture") or ""
    if not architecture:
        raise GGUFError(f"{first.path}: the GGUF file names no architecture")
    tensors = [t for shard in shards for t in shard.tensors]
    if not tensors:
        raise GGUFError(f"{first.path}: the GGUF file holds no tensors (a vocabulary-only file?)")

    def arch(key: str):
        return meta.get(f"{architecture}.{key}")

    embedding_length = _int(arch("embedding_length"))
    head_count = _int(arch("attention.head_count"))
    head_dim = _int(arch("attention.key_length"))
    if head_dim is None and embedding_length and head_count:
        head_dim = embedding_length // head_count
    return GGUFReport(
        path=str(first.path),
        files=[str(shard.path) for shard in shards],
        name=str(meta.get("general.name") or ""),
        architecture=architecture,
        parameter_count=sum(t.n_elements for t in tensors),
        tensor_count=len(tensors),
        tensor_bytes=sum(t.n_bytes for t in tensors),
        file_bytes=sum(shard.file_bytes for shard in shards),
        file_type=_file_type_name(meta.get("general.file_type")),
        tensor_types=dict(Counter(t.type for t in tensors).most_common()),
        block_count=_int(arch("block_count")),
        embedding_length=embedding_length,
        feed_forward_length=_int(arch("feed_forward_length")),
        head_count=head_count,
        head_count_kv=_int(arch("attention.head_count_kv")) or head_count,
        head_dim=head_dim,
        context_length=_int(arch("context_length")),
        expert_count=_int(arch("expert_count")),
        expert_used_count=_int(arch("expert_used_count")),
        vocab_size=_int(arch("vocab_size")) or meta.get("tokenizer.ggml.tokens"),
        has_chat_template=bool(meta.get("tokenizer.chat_template")),
        tensors=tensors,
    )


@dataclass(frozen=True)
class _Header:
    """One file's header: its split keys, the metadata we use, its tensor table."""

    path: Path
    file_bytes: int
    split_no: int | None
    split_count: int | None
    split_tensors: int | None
    metadata: dict
    tensors: tuple[TensorInfo, ...]


def _header(path: Path) -> _Header:
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a file")
    stat = path.stat()
    return _read_header(path, stat.st_size, stat.st_mtime_ns)


# Bump when _Header changes: summaries cached in an older form are not read.
HEADER_FORMAT = 1


@lru_cache(maxsize=64)
def _read_header(path: Path, file_bytes: int, mtime_ns: int) -> _Header:
    shared = _shared_cache()
    key = _cache_key(path, file_bytes, mtime_ns)
    header = shared.get(key) if shared is not None else None
    if header is None:
        header = _parse_header(path, file_bytes)
        if shared is not None:
            shared.set(key, header)
    return header


def _cache_key(path: Path, file_bytes: int, mtime_ns: int) -> str:
    identity = f"{HEADER_FORMAT}|{path.resolve()}|{file_bytes}|{mtime_ns}"
    return "gguf-header-" + hashlib.sha256(identity.encode()).hexdigest()


def _shared_cache():
    """Django's "gguf" cache, where Django is set up with one; else None."""
    from django.conf import settings

    if not settings.configured or "gguf" not in getattr(settings, "CACHES", {}):
        return None
    from django.core.cache import caches

    return caches["gguf"]


def _parse_header(path: Path, file_bytes: int) -> _Header:
    from gguf import GGUFReader, GGUFValueType

    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the library raises several types for damaged files
        raise GGUFError(f"{path}: damaged or truncated GGUF file ({exc})") from exc
    if reader.tensors:
        end_of_data = max(t.data_offset + t.n_bytes for t in reader.tensors)
        if end_of_data > file_bytes:
            raise GGUFError(
                f"{path}: truncated: the tensors need {end_of_data:,} bytes "
                f"but the file has {file_bytes:,}"
            )

    # The keys this module reads (general.*, split.*, the architecture's own), not
    # the vocabulary's arrays: of those only the token count is kept.
    architecture = ""
    if "general.architecture" in reader.fields:
        architecture = reader.fields["general.architecture"].contents()
    metadata: dict = {}
    for name, f in reader.fields.items():
        if name == "tokenizer.ggml.tokens":
            metadata[name] = len(f.data)
        elif name == "tokenizer.chat_template":
            metadata[name] = bool(f.contents())
        elif name.startswith(("general.", "split.")) or (
            architecture and name.startswith(f"{architecture}.")
        ):
            is_long_array = f.types[0] == GGUFValueType.ARRAY and len(f.data) > 4096
            metadata[name] = len(f.data) if is_long_array else f.contents()

    def split_key(key: str) -> int | None:
        value = metadata.get(key)
        return None if value is None else int(value)

    return _Header(
        path=path,
        file_bytes=file_bytes,
        split_no=split_key(SPLIT_NO),
        split_count=split_key(SPLIT_COUNT),
        split_tensors=split_key(SPLIT_TENSORS),
        metadata=metadata,
        tensors=tuple(
            TensorInfo(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes))
            for t in reader.tensors
        ),
    )
