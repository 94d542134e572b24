"""In a real browser, the pages work under their Content-Security-Policy: the chat
streams an answer over its websocket, the usage charts draw, and Chromium reports
no violation of the policy on any of them."""

from __future__ import annotations

import pytest

from tests.browser import log_in

pytestmark = pytest.mark.browser

# Collects the page's securitypolicyviolation events, from before any script runs.
LISTEN = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) =>
  window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


def test_the_pages_run_under_the_policy_without_a_violation(stack, cast, default_model, browser):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.context.add_init_script(LISTEN)
    console = []
    page.on("console", lambda message: console.append(message.text))

    page.goto(f"{stack.http_url}/")
    page.fill("#input", "Say hello.")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant:last-child[data-state=done]", timeout=120_000)
    assert page.locator(".msg.assistant .body").last.inner_text().strip()
    violations = page.evaluate("window.__cspViolations")

    for path in ("/usage/", "/jobs/", "/planner/", "/account/invitations/"):
        page.goto(f"{stack.http_url}{path}")
        page.wait_for_load_state("networkidle")
        violations += page.evaluate("window.__cspViolations")

    page.goto(f"{stack.http_url}/usage/")
    page.wait_for_function("() => Chart.getChart(document.querySelector('canvas')) !== undefined")
    violations += page.evaluate("window.__cspViolations")

    assert violations == []
    assert [text for text in console if "Content Security Policy" in text] == []
