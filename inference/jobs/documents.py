"""Reading the document of a job: pasted text, or an uploaded .txt, .md or .pdf file.

Every refusal is a DocumentError whose message can be shown on the form as it
is. Nothing here touches the database or the model.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import PurePath

import pypdf
from django.conf import settings
from pypdf.errors import FileNotDecryptedError, LimitReachedError, PyPdfError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED = ".txt, .md or .pdf"
# A PDF stream may expand to at most this many times the upload limit when it is
# decompressed: more is a decompression bomb, not a document.
PDF_EXPANSION_FACTOR = 4


class DocumentError(ValueError):
    """The document cannot be used; the message says why, in the user's words."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def upload_limit_bytes() -> int:
    return settings.JOB_UPLOAD_MAX_BYTES


def _seconds(n: float) -> str:
    return f"{n:g} s"


def _megabytes(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB" if n >= 100_000 else f"{n:,} bytes"


def check_size(size: int, what: str) -> None:
    limit = upload_limit_bytes()
    if size > limit:
        raise DocumentError(
            f"{what} is {_megabytes(size)}; the limit is {_megabytes(limit)}.", code="too_large"
        )


def clean_pasted_text(text: str) -> str:
    """Pasted text: not empty, within the size limit."""
    text = (text or "").replace("\r\n", "\n")
    if not text.strip():
        raise DocumentError("The document is empty.", code="empty")
    check_size(len(text.encode("utf-8")), "The pasted text")
    return text


def read_upload(name: str, data: bytes, size: int | None = None) -> str:
    """The text of an uploaded file, or DocumentError. `size` is the file's full size
    when `data` holds only its beginning."""
    display = PurePath(name or "file").name[:100]
    check_size(max(size or 0, len(data)), f"{display}")
    if not data:
        raise DocumentError(f"{display} is empty.", code="empty")
    suffix = PurePath(name or "").suffix.lower()
    if suffix in PDF_SUFFIXES:
        text = _read_pdf(display, data)
    elif suffix in TEXT_SUFFIXES:
        text = _read_text(display, data)
    else:
        shown = suffix or "a file without an extension"
        raise DocumentError(
            f"{display}: {shown} is not supported. Upload a {SUPPORTED} file, or paste the text.",
            code="unsupported_type",
        )
    if not text.strip():
        raise DocumentError(f"{display} has no text in it.", code="empty")
    return text


def _read_text(display: str, data: bytes) -> str:
    if data.startswith(b"%PDF-"):
        raise DocumentError(
            f"{display} is a PDF file with a text name; rename it to .pdf.",
            code="unsupported_type",
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DocumentError(
            f"{display} is not valid UTF-8 (byte {exc.start + 1:,}, line {line}). "
            "Save it as UTF-8 and upload it again.",
            code="invalid_utf8",
        ) from None
    if "\x00" in text:
        raise DocumentError(
            f"{display} looks like a binary file, not text. Upload a {SUPPORTED} file.",
            code="unsupported_type",
        )
    return text.replace("\r\n", "\n")


def _check_page_count(display: str, pages: int) -> None:
    limit = settings.JOB_PDF_MAX_PAGES
    if pages > limit:
        raise DocumentError(
            f"{display} has {pages:,} pages; the limit is {limit:,}. Upload fewer pages, "
            "or paste the text.",
            code="too_many_pages",
        )


def _read_pdf(display: str, data: bytes) -> str:
    if not data.lstrip()[:5] == b"%PDF-":
        raise DocumentError(f"{display} is not a PDF file.", code="unsupported_type")
    expansion_limit = upload_limit_bytes() * PDF_EXPANSION_FACTOR
    text_limit = upload_limit_bytes()
    limits = {
        "maximum_declared_stream_length": expansion_limit,
        "array_based_stream_maximum_output_length": expansion_limit,
        "lzw_maximum_output_length": expansion_limit,
        "run_length_maximum_output_length": expansion_limit,
        "zlib_maximum_output_length": expansion_limit,
        "brotli_maximum_output_length": expansion_limit,
        "stream_decoding_work_maximum_length": expansion_limit,
    }
    pages: list[str] = []
    size = 0
    try:
        with pypdf.apply_configuration(**limits):
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise DocumentError(
                    f"{display} is password-protected; upload an unprotected copy.",
                    code="encrypted",
                )
            _check_page_count(display, len(reader.pages))
            # Checked between pages: a PDF can be made to take minutes to read.
            deadline = time.monotonic() + settings.JOB_PDF_READ_BUDGET_S
            for number, page in enumerate(reader.pages):
                if time.monotonic() > deadline:
                    raise DocumentError(
                        f"Reading the text of {display} took longer than "
                        f"{_seconds(settings.JOB_PDF_READ_BUDGET_S)}, the limit ({number:,} of "
                        f"{len(reader.pages):,} pages were read). Upload fewer pages, or paste "
                        "the text.",
                        code="too_slow",
                    )
                page_text = page.extract_text() or ""
                size += len(page_text.encode("utf-8"))
                if size > text_limit:
                    raise DocumentError(
                        f"The text of {display} is over {_megabytes(text_limit)}, the limit.",
                        code="too_large",
                    )
                pages.append(page_text)
    except LimitReachedError:
        raise DocumentError(
            f"{display} expands to more than {_megabytes(expansion_limit)} when decompressed; "
            "it was not read.",
            code="decompression_bomb",
        ) from None
    except FileNotDecryptedError:
        raise DocumentError(
            f"{display} is password-protected; upload an unprotected copy.", code="encrypted"
        ) from None
    except DocumentError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, RecursionError, OSError) as exc:
        log.info("unreadable PDF %s: %s", display, exc)
        raise DocumentError(f"{display} could not be read as a PDF.", code="bad_pdf") from None
    text = "\n\n".join(p.strip("\n") for p in pages)
    if not text.strip():
        raise DocumentError(
            f"{display} has no text layer (a scan or images only). "
            "Run it through OCR first, or paste the text.",
            code="no_text_layer",
        )
    return text
