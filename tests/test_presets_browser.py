"""The chat's Preset picker and Save as preset in a real browser, without a server:
Chromium's requests are answered by Django's test client (pages, with their
Content-Security-Policy, and the save form's post) and by the files under static/.
The chat's websocket has nothing to reach; the settings panel does not need it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from inference.models import Preset
from inference.services import clean_params
from mixtralweb.accounts.models import Membership, Team

pytestmark = pytest.mark.browser
STATIC = Path(__file__).resolve().parent.parent / "static"
ORIGIN = "http://testserver"


def answer_with_django(client: Client):
    def handle(route):
        request = route.request
        url = urlsplit(request.url)
        if url.path.startswith("/static/"):
            file = STATIC / url.path.removeprefix("/static/")
            return route.fulfill(path=file) if file.is_file() else route.fulfill(status=404)
        headers = {"HTTP_ACCEPT": request.headers.get("accept", "")}
        if request.method == "POST":
            response = client.generic(
                "POST",
                url.path,
                request.post_data_buffer,
                content_type=request.headers["content-type"],
                **headers,
            )
        else:
            response = client.get(url.path + (f"?{url.query}" if url.query else ""), **headers)
        route.fulfill(
            status=response.status_code, headers=dict(response.items()), body=response.content
        )

    return handle


def test_picking_a_preset_fills_the_settings_and_saving_one_adds_it(browser, db):
    User = get_user_model()
    alice = User.objects.create_user("alice", password="alice-pass-123")
    bob = User.objects.create_user("bob", password="bob-pass-123")
    red = Team.objects.create(name="Red")
    Membership.objects.create(team=red, user=alice)
    Membership.objects.create(team=red, user=bob)
    Preset.objects.create(
        owner=bob,
        team=red,
        name="Pirate",
        system_prompt="Talk like a pirate.",
        params=clean_params({"temperature": 1.2, "max_tokens": 64, "seed": 7}),
        model_name="tiny",  # served by no worker here: the picked model stays
    )
    client = Client()
    client.force_login(alice)
    context = browser.new_context(viewport={"width": 375, "height": 800})
    errors = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.route(f"{ORIGIN}/**", answer_with_django(client))
        page.goto(f"{ORIGIN}/")

        page.select_option("#preset", label="Pirate · bob")
        assert page.input_value("#system-prompt") == "Talk like a pirate."
        values = [page.input_value(f"#p-{n}") for n in ("temperature", "top_p", "max_tokens")]
        assert values == ["1.2", "0.95", "64"]
        assert page.input_value("#p-seed") == "7"
        assert "no worker serves now" in page.inner_text("#preset-note")

        # Changed, then saved from the keyboard: the name box, Enter.
        page.fill("#p-temperature", "0.25")  # off the field's step: still allowed
        assert page.input_value("#preset") == ""  # the fields no longer say "Pirate"
        page.click("text=Save as preset…")
        page.fill("#preset-save input[name=name]", "Calm pirate")
        page.keyboard.press("Enter")
        page.wait_for_function(
            "document.getElementById('preset-save-status').textContent.startsWith('Saved')"
        )
        saved = Preset.objects.get(owner=alice)
        assert saved.name == "Calm pirate" and saved.system_prompt == "Talk like a pirate."
        assert saved.params == {"temperature": 0.25, "top_p": 0.95, "max_tokens": 64, "seed": 7}
        assert page.input_value("#preset") == str(saved.pk)
        assert page.locator("#my-presets option").all_inner_texts() == ["Calm pirate"]
        assert errors == []
    finally:
        context.close()
