"""The chat's Preset picker and Save as preset in a real browser, against the running
stack: picking a team-mate's preset fills the settings, and a changed one is saved
from the keyboard at phone width."""

from __future__ import annotations

import pytest

from inference.models import Preset
from inference.services import clean_params
from tests.browser import log_in

pytestmark = pytest.mark.browser


def test_picking_a_preset_fills_the_settings_and_saving_one_adds_it(
    stack, cast, default_model, browser
):
    Preset.objects.create(
        owner=cast.bob,
        team=cast.red,
        name="Pirate",
        system_prompt="Talk like a pirate.",
        params=clean_params({"temperature": 1.2, "max_tokens": 64, "seed": 7}),
        model_name="tiny",  # served by no worker here: the picked model stays
    )
    page = log_in(browser, stack, "alice", "alice-pass-123", viewport={"width": 375, "height": 800})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{stack.http_url}/")

    page.select_option("#preset", label="Pirate · bob")
    assert page.input_value("#system-prompt") == "Talk like a pirate."
    values = [page.input_value(f"#p-{n}") for n in ("temperature", "top_p", "max_tokens")]
    assert values == ["1.2", "0.95", "64"]
    assert page.input_value("#p-seed") == "7"
    assert "no worker serves now" in page.inner_text("#preset-note")

    # Changed, then saved from the keyboard: the name box, Enter.
    page.fill("#p-temperature", "0.25")  # off the field's step: still allowed
    assert page.input_value("#preset") == ""  # the fields no longer say "Pirate"
    assert page.inner_text("#preset-note") == ""
    page.click("text=Save as preset…")
    page.fill("#preset-save input[name=name]", "Calm pirate")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.getElementById('preset-save-status').textContent.startsWith('Saved')"
    )
    saved = Preset.objects.get(owner=cast.alice)
    assert saved.name == "Calm pirate" and saved.system_prompt == "Talk like a pirate."
    assert saved.params == {"temperature": 0.25, "top_p": 0.95, "max_tokens": 64, "seed": 7}
    assert page.input_value("#preset") == str(saved.pk)
    assert page.locator("#my-presets option").all_inner_texts() == ["Calm pirate"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert errors == []
