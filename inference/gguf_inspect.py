"""What a GGUF file is, read with the `gguf` library before any worker loads it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """The file cannot be served; the message names the file and what is wrong."""


@dataclass
class GGUFReport:
    path: str
    architecture: str
    context_length: int | None
    has_chat_template: bool
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return asdict(self)


def _field_value(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def inspect_gguf(path: str | Path) -> GGUFReport:
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the library raises several types for damaged files
        raise GGUFError(f"{path}: damaged or truncated GGUF file ({exc})") from exc
    architecture = _field_value(reader, "general.architecture") or ""
    if not architecture:
        raise GGUFError(f"{path}: the GGUF file names no architecture")
    context_length = _field_value(reader, f"{architecture}.context_length")
    return GGUFReport(
        path=str(path),
        architecture=architecture,
        context_length=int(context_length) if context_length is not None else None,
        has_chat_template=_field_value(reader, "tokenizer.chat_template") is not None,
    )
