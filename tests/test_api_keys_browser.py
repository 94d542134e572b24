"""The API keys page in a real browser, on a 375 px phone and from the keyboard only:
a key is created with an expiry and a limit, and the keys read without sideways
scrolling."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from mixtralweb.accounts.models import ApiKey
from tests.browser import log_in, screenshot_dir

pytestmark = pytest.mark.browser


def test_a_key_is_created_from_the_keyboard_on_a_phone(browser, stack, cast):
    used, _ = ApiKey.issue(user=cast.alice, name="nightly report", requests_per_minute=3)
    ApiKey.objects.filter(pk=used.pk).update(last_used_at=timezone.now() - timedelta(hours=2))
    page = log_in(browser, stack, "alice", "alice-pass-123", viewport={"width": 375, "height": 800})
    page.goto(f"{stack.http_url}/account/keys/")
    # Every field of the form in order, each reached with Tab and labelled.
    page.focus("#id_name")
    page.keyboard.type("phone script")
    order = []
    while len(order) < 6:
        page.keyboard.press("Tab")
        focused = page.evaluate("(e => e.name || e.textContent)(document.activeElement)")
        if not order or order[-1] != focused:  # a date input is several stops in one
            order.append(focused)
    assert order == [
        "expires",
        "expires_on",
        "tokens_per_day",
        "requests_per_minute",
        "concurrent_generations",
        "Create key",
    ]
    for name in order[:-1]:
        assert page.locator(f"label[for=id_{name}]").is_visible()
    page.focus("#id_expires")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    assert page.input_value("#id_expires") == "90"
    page.focus("#id_concurrent_generations")
    page.keyboard.type("2")
    page.keyboard.press("Enter")
    page.wait_for_selector("#new-key-secret")
    key = ApiKey.objects.get(name="phone script")
    assert key.concurrent_generations == 2 and key.expires_at > timezone.now() + timedelta(days=89)

    # The keys read as labelled lines, within the screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    table = page.locator("#my-keys")
    assert table.evaluate("t => t.parentElement.scrollWidth <= t.parentElement.clientWidth")
    row = page.locator("#my-keys tbody tr", has_text="nightly report")
    last_used = row.locator("td[data-label='Last used']").inner_text().replace("\xa0", " ")
    assert last_used.endswith("2 hours ago")
    assert "3 requests per minute" in row.inner_text()
    assert row.locator("td[data-label=Expires]").inner_text().endswith("never")
    page.screenshot(path=str(screenshot_dir() / "api-keys-phone.png"), full_page=True)
