"""The chat's Preset picker and Save as preset in a real browser, without a server:
Chromium's requests are answered by Django's test client (the page, with its
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


def fulfill_from(route, response) -> None:
    route.fulfill(
        status=response.status_code, headers=dict(response.items()), body=response.content
    )


def serve(page_response, posts: list):
    """Chromium's requests: static files from disk, the chat page as rendered, and
    posts kept for the test to answer with Django in its own thread (a route handler
    runs elsewhere, with a database connection that does not see the test's rows)."""

    def handle(route):
        request = route.request
        path = urlsplit(request.url).path
        if path.startswith("/static/"):
            file = STATIC / path.removeprefix("/static/")
            return route.fulfill(path=file) if file.is_file() else route.fulfill(status=404)
        if request.method == "POST":
            return posts.append(route)
        if path == "/":
            return fulfill_from(route, page_response)
        return route.fulfill(status=404)

    return handle


def answer_post(page, client: Client, posts: list) -> None:
    """Wait for the page's post, and answer it with the test client."""
    for _ in range(200):
        if posts:
            break
        page.wait_for_timeout(25)
    route = posts.pop()
    request = route.request
    response = client.generic(
        "POST",
        urlsplit(request.url).path,
        request.post_data_buffer,
        content_type=request.headers["content-type"],
        HTTP_ACCEPT=request.headers.get("accept", ""),
    )
    fulfill_from(route, response)


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
        posts = []
        page.route(f"{ORIGIN}/**", serve(client.get("/"), posts))
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
        assert page.inner_text("#preset-note") == ""
        page.click("text=Save as preset…")
        page.fill("#preset-save input[name=name]", "Calm pirate")
        page.keyboard.press("Enter")
        answer_post(page, client, posts)
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
