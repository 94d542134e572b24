"""Documents for the job tests, made here: deterministic text of a chosen length,
and small PDF files written byte by byte (with a text layer, without one, and a
decompression bomb)."""

from __future__ import annotations

import random
import zlib

WORDS = (
    "the river city council harbour report budget ship trade winter north market school "
    "bridge road farmer grain price water museum library station garden mill railway "
    "festival bakery lighthouse ferry orchard quarry"
).split()


def document(paragraphs: int, seed: int = 1) -> str:
    """Plain English-like prose; 100 paragraphs are about 7,300 SmolLM2 tokens."""
    rnd = random.Random(seed)
    out = []
    for number in range(paragraphs):
        sentences = [
            " ".join(rnd.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(5)
        ]
        out.append(f"Section {number + 1}. " + " ".join(sentences))
    return "\n\n".join(out)


def pdf(content: bytes, compress: bool = False) -> bytes:
    """A one-page PDF whose page draws `content` (a PDF content stream)."""
    stream_dict = b"<< /Length %d >>"
    if compress:
        content = zlib.compress(content, 9)
        stream_dict = b"<< /Length %d /Filter /FlateDecode >>"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        (stream_dict % len(content)) + b"\nstream\n" + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def pdf_with_text(lines: list[str]) -> bytes:
    ops = [b"BT /F1 12 Tf 72 720 Td 14 TL"]
    for line in lines:
        escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops.append(b"(" + escaped.encode("latin-1") + b") Tj T*")
    ops.append(b"ET")
    return pdf(b"\n".join(ops))


def pdf_without_text() -> bytes:
    """A page with only a drawn line: what a scan without OCR looks like to a reader."""
    return pdf(b"0 0 m 200 200 l S")


def pdf_bomb(expanded_bytes: int) -> bytes:
    """A small PDF whose content stream inflates to `expanded_bytes`."""
    return pdf(b"BT /F1 12 Tf 72 720 Td (x) Tj ET\n" + b" " * expanded_bytes, compress=True)


def register_smollm2(n_ctx: int | None = None):
    """The embedded model's row, written directly: inspecting the GGUF file again for
    every test (as ensure_default_model does after a flush) takes seconds. A smaller
    n_ctx makes smaller chunks, for tests about the steps rather than the size."""
    from django.conf import settings

    from inference.models import LanguageModel
    from inference.registry import default_model_path

    model, _ = LanguageModel.objects.get_or_create(
        name=settings.DEFAULT_MODEL_NAME,
        defaults={
            "path": str(default_model_path()),
            "n_ctx": n_ctx or settings.DEFAULT_MODEL_N_CTX,
            "has_chat_template": True,
            "architecture": "llama",
        },
    )
    if n_ctx and model.n_ctx != n_ctx:
        model.n_ctx = n_ctx
        model.save(update_fields=["n_ctx"])
    return model


def pdf_of_pages(pages: int, lines: list[str]) -> bytes:
    """A PDF of `pages` copies of a page of text, written by pypdf."""
    import io

    import pypdf

    page = pypdf.PdfReader(io.BytesIO(pdf_with_text(lines))).pages[0]
    writer = pypdf.PdfWriter()
    for _ in range(pages):
        writer.add_page(page)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
