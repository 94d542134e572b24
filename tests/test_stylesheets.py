"""The stylesheets under static/css/: each states a rule once (a second copy is
dead weight that the next edit changes in one place only)."""

import re
from collections import Counter
from pathlib import Path

import pytest

CSS = sorted((Path(__file__).resolve().parent.parent / "static" / "css").glob("*.css"))


def rules(text: str) -> list[tuple[str, str]]:
    """(selector, declarations) of every rule, whitespace normalised; a rule inside
    @media counts apart only by its declarations (an override differs in them)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return [
        (" ".join(selector.split()), " ".join(body.split()))
        for selector, body in re.findall(r"([^{}]+)\{([^{}]*)\}", text)
    ]


@pytest.mark.parametrize("path", CSS, ids=[p.name for p in CSS])
def test_each_rule_is_stated_once(path):
    repeated = [selector for (selector, _), n in Counter(rules(path.read_text())).items() if n > 1]
    assert repeated == []
