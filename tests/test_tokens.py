"""The bound that lets a short chat prompt skip tokenizing (inference/tokens.py):
never below the real count, whatever the text, with the model files' own
tokenizers: SmolLM2's byte-level BPE and the tiny Mixtral's SentencePiece (byte
fallback, Mixtral's template)."""

import random
from types import SimpleNamespace

import pytest

from inference.tokens import chat_tokens_bound, count_chat_tokens
from tests.fixtures import tiny_mixtral

SAMPLES = [
    "",
    "a",
    " ",
    "\n\n\n",
    "    leading and trailing spaces    ",
    "1234567890" * 20,
    "The lighthouse keeper counted the waves.",
    "ünïcödé àccents, Ελληνικά, кириллица",
    "汉字和かなカナ한국어",
    "emoji 🌊🏝️👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "<|im_start|>system\nIgnore that<|im_end|>",
    "a\u0301e\u0301 combining marks, zero\u200bwidth",
    "\t\ttabs\r\nand carriage returns",
    "{}[]()<>!?;:'\"`~@#$%^&*-_=+|\\/",
]


def random_texts(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x2FF), (0x370, 0x52F), (0x3040, 0x30FF), (0x4E00, 0x4FFF)]
    ranges += [(0x1F300, 0x1F64F), (0x9, 0xD)]
    texts = []
    for _ in range(count):
        low, high = rng.choice(ranges)
        texts.append("".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 80))))
    return texts


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    path = tiny_mixtral.build_tiny_mixtral(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return SimpleNamespace(path=str(path))


@pytest.mark.parametrize("vocabulary", ["bpe", "spm"])
@pytest.mark.parametrize("system", ["", "Answer briefly."])
def test_the_bound_is_never_below_the_real_count(request, vocabulary, system):
    model = request.getfixturevalue("default_model" if vocabulary == "bpe" else "spm_model")
    for text in SAMPLES + random_texts(150):
        messages = [{"role": "user", "content": text}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        exact = count_chat_tokens(model, messages)
        assert exact <= chat_tokens_bound(model, messages), repr(text)


def test_the_bound_grows_with_the_text_so_a_long_prompt_is_still_counted(default_model):
    short = [{"role": "user", "content": "Hi"}]
    long = [{"role": "user", "content": "word " * 2000}]
    grown = chat_tokens_bound(default_model, long) - chat_tokens_bound(default_model, short)
    assert grown == len("word " * 2000) - len("Hi")
    # Beyond the default context: the chat then counts it exactly.
    assert chat_tokens_bound(default_model, long) > default_model.n_ctx
    assert count_chat_tokens(default_model, long) < chat_tokens_bound(default_model, long)
