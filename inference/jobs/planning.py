"""How a job's document is put to the model: the prompts, their token counts, and
the split into chunks that fit the context.

Counting goes through inference.tokens: the model's own tokenizer and chat
template, exactly as the worker renders the prompt, so a chunk that is counted to
fit does fit. The web process loads only the vocabulary, never the weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from inference.tokens import ChatTemplateError, count_chat_tokens, count_plain_tokens

# Room left free in every chunk for what counting piece by piece cannot see
# (tokens that merge across the seams, the part numbers in the prompt).
SAFETY_TOKENS = 32
# A chunk smaller than this is not worth a pass: the instruction or max_tokens is
# too large for this model's context.
MIN_CHUNK_TOKENS = 256


class PlanError(ValueError):
    """The job cannot be laid out in this context; the message says why."""


def count_text(model, text: str) -> int:
    """Tokens of `text` alone, as the worker tokenizes a message's text (plain text:
    a document's `</s>` is characters, not a control token)."""
    return count_plain_tokens(model, text) if text else 0


def count_chat(model, messages: Sequence[dict]) -> int:
    """Tokens of the whole prompt the worker will evaluate for these messages."""
    try:
        return count_chat_tokens(model, messages)
    except ChatTemplateError as exc:
        raise PlanError(str(exc)) from None


# --- prompts ---------------------------------------------------------------------
def single_messages(instruction: str, document: str) -> list[dict]:
    return [{"role": "user", "content": f"{instruction}\n\n<document>\n{document}\n</document>"}]


def map_messages(instruction: str, part: str, number: int, total: int) -> list[dict]:
    return [
        {
            "role": "user",
            "content": (
                f"{instruction}\n\nThis is part {number} of {total} of a longer document. "
                f'Answer from this part only.\n\n<document part="{number} of {total}">\n'
                f"{part}\n</document>"
            ),
        }
    ]


def combine_messages(instruction: str, answers: Sequence[str]) -> list[dict]:
    parts = "\n\n".join(
        f'<answer part="{n}">\n{answer.strip()}\n</answer>' for n, answer in enumerate(answers, 1)
    )
    return [
        {
            "role": "user",
            "content": (
                f"{instruction}\n\nThe document was too long to read at once, so it was read in "
                f"{len(answers)} parts and each part was answered on its own. Combine these "
                f"answers into one answer to the instruction above.\n\n{parts}"
            ),
        }
    ]


# --- splitting -------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    start: int
    end: int
    prompt_tokens: int


# From the coarsest boundary to the finest: a chunk ends at a paragraph if it can.
_SEPARATORS = [
    re.compile(r"\n[ \t]*\n"),
    re.compile(r"\n"),
    re.compile(r"(?<=[.!?])\s"),
    re.compile(r"\s"),
]


def _units(model, text: str, start: int, end: int, budget: int, level: int = 0):
    """(start, end, tokens) pieces of text[start:end], each at most `budget` tokens."""
    tokens = count_text(model, text[start:end])
    if tokens <= budget:
        yield start, end, tokens
        return
    if level < len(_SEPARATORS):
        cuts = [m.end() for m in _SEPARATORS[level].finditer(text, start, end)]
        cuts = [c for c in cuts if start < c < end]
        if cuts:
            pieces = zip([start, *cuts], [*cuts, end], strict=True)
            for piece_start, piece_end in pieces:
                yield from _units(model, text, piece_start, piece_end, budget, level + 1)
            return
        yield from _units(model, text, start, end, budget, level + 1)
        return
    # No boundary at all: cut in the middle of the characters.
    middle = (start + end) // 2
    yield from _units(model, text, start, middle, budget, level)
    yield from _units(model, text, middle, end, budget, level)


def _pack(units, budget: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    current_start, current_end, current_tokens = None, None, 0
    for start, end, tokens in units:
        if current_start is not None and current_tokens + tokens > budget:
            spans.append((current_start, current_end))
            current_start, current_tokens = None, 0
        if current_start is None:
            current_start = start
        current_end = end
        current_tokens += tokens
    if current_start is not None:
        spans.append((current_start, current_end))
    return spans


def chunk_budget(model, instruction: str, max_tokens: int, n_ctx: int) -> int:
    """Document tokens one map pass can hold."""
    overhead = count_chat(model, map_messages(instruction, "", 99, 99))
    return n_ctx - max_tokens - overhead - SAFETY_TOKENS


def combine_budget(model, instruction: str, max_tokens: int, n_ctx: int) -> int:
    """Answer tokens one combine pass can hold (each answer also carries its tags)."""
    overhead = count_chat(model, combine_messages(instruction, []))
    return n_ctx - max_tokens - overhead - SAFETY_TOKENS


def answer_tokens(model, answer: str) -> int:
    """What one answer adds to a combine prompt."""
    return count_text(model, f'<answer part="99">\n{answer.strip()}\n</answer>\n\n')


def check_map_reduce(model, instruction: str, max_tokens: int, n_ctx: int) -> None:
    """Raise PlanError unless chunks and combines both have room to work."""
    if chunk_budget(model, instruction, max_tokens, n_ctx) < MIN_CHUNK_TOKENS:
        raise PlanError(
            f"The instruction and {max_tokens} new tokens leave too little of the "
            f"{n_ctx}-token context for the document. Shorten the instruction or lower "
            "the maximum new tokens."
        )
    # A combine must hold at least two full answers, or combining never converges.
    one_answer = max_tokens + answer_tokens(model, "") + SAFETY_TOKENS
    if combine_budget(model, instruction, max_tokens, n_ctx) < 2 * one_answer:
        raise PlanError(
            f"With {max_tokens} new tokens per pass, two answers cannot be combined in the "
            f"{n_ctx}-token context. Lower the maximum new tokens to about "
            f"{max(1, (n_ctx - 4 * SAFETY_TOKENS) // 4)} or less."
        )


def split_document(
    model, instruction: str, document: str, max_tokens: int, n_ctx: int
) -> list[Chunk]:
    """Chunks of the document, each of whose map prompt fits with max_tokens."""
    check_map_reduce(model, instruction, max_tokens, n_ctx)
    budget = chunk_budget(model, instruction, max_tokens, n_ctx)
    for _attempt in range(6):
        spans = _pack(_units(model, document, 0, len(document), budget), budget)
        chunks = []
        for number, (start, end) in enumerate(spans, 1):
            messages = map_messages(instruction, document[start:end], number, len(spans))
            chunks.append(Chunk(start, end, count_chat(model, messages)))
        if all(c.prompt_tokens + max_tokens <= n_ctx for c in chunks):
            return chunks
        # Counting piece by piece came out short somewhere: pack tighter.
        budget = int(budget * 0.95)
    raise PlanError("The document could not be split into chunks that fit the context.")


def group_answers(
    model, answer_texts: Sequence[str], max_tokens: int, n_ctx: int, instruction: str
):
    """(start, end) index ranges of answers that fit one combine pass each."""
    budget = combine_budget(model, instruction, max_tokens, n_ctx)
    units = [(i, i + 1, answer_tokens(model, a)) for i, a in enumerate(answer_texts)]
    return _pack(units, budget)
