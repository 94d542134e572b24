"""Playwright for Python driving Debian's Chromium (never a downloaded browser)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def screenshot_dir() -> Path:
    """Where browser tests save their screenshots: var/screenshots/, so that a test run
    leaves the repository clean; `make screenshots` points it at docs/screenshots/."""
    root = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("SCREENSHOT_DIR") or root / "var" / "screenshots")


@pytest.fixture(scope="module")
def browser():
    """One Chromium per test module. Module scope, not session: Playwright's sync
    API keeps an event loop running in this thread while it is open, which would
    stop later tests from calling Django's async views through the test client."""
    from playwright.sync_api import sync_playwright

    # The tests' own ORM calls are synchronous and safe while that loop runs
    # (Django's documented escape hatch); set only while the browser is open.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def log_in(browser, stack, username: str, password: str, viewport=None):
    """A new browser context, logged in through the login form."""
    context = browser.new_context(viewport=viewport or {"width": 1200, "height": 850})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{stack.http_url}/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.http_url}/")
    return page
