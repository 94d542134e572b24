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


COLOUR = re.compile(r"#[0-9a-f]{3,8}\b|\b(?:rgba?|hsla?)\(", re.IGNORECASE)
# The 503 page's stylesheet stands alone (no app.css): its colours are its own.
STANDALONE = {"unavailable.css"}


@pytest.mark.parametrize("path", CSS, ids=[p.name for p in CSS])
def test_each_colour_names_its_light_and_dark_values(path):
    """A colour is written as light-dark(light, dark), and in the app's stylesheets
    only as a custom property in app.css's :root: a literal anywhere else would look
    the same in both themes."""
    offenders = []
    for selector, body in rules(path.read_text()):
        for declaration in filter(None, (d.strip() for d in body.split(";"))):
            prop, _, value = declaration.partition(":")
            if not COLOUR.search(value):
                continue
            themed = value.strip().startswith("light-dark(")
            declared = prop.strip().startswith("--") and selector == ":root"
            if not themed or (path.name not in STANDALONE and not declared):
                offenders.append(f"{selector} {{ {declaration} }}")
    assert offenders == []
