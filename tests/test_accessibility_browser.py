"""Accessibility and the two themes in a real browser (Debian's Chromium): axe-core
finds no serious or critical violation on the login, chat, jobs, usage and planner
pages, light or dark; the theme follows prefers-color-scheme until the header's
button picks one, which the next page load keeps, from its first paint.

axe-core is vendored for the tests only (tests/vendor/axe-core/, never served): it
is evaluated into each loaded page through the DevTools protocol, which the page's
Content-Security-Policy does not govern (a <script> tag would be an inline script)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.jobs.models import Job
from inference.models import Conversation, Generation, Message
from tests.browser import screenshot_dir

pytestmark = pytest.mark.browser

AXE = Path(__file__).resolve().parent / "vendor" / "axe-core" / "axe.min.js"

ANSWER = """Here is the loop:

```python
for n in range(3):
    print(n)  # one line each
```

| n | square |
|---|--------|
| 2 | 4 |
"""

# The violations that matter, one line each: rule, impact, the first offending nodes.
AXE_RUN = """async () => {
  const result = await axe.run(document, { resultTypes: ["violations"] });
  return result.violations
    .filter((v) => v.impact === "serious" || v.impact === "critical")
    .map((v) => `${v.id} (${v.impact}): ` + v.nodes.slice(0, 3)
      .map((n) => `${n.target.join(" ")} — ${(n.failureSummary || "").replace(/\\s+/g, " ")}`)
      .join("; "));
}"""


def axe_violations(page) -> list[str]:
    if not page.evaluate("typeof window.axe === 'object'"):
        page.evaluate(AXE.read_text())
    return page.evaluate(AXE_RUN)


def theme(page) -> str | None:
    return page.evaluate("document.documentElement.dataset.theme")


def background(page, selector: str = "body") -> str:
    return page.eval_on_selector(selector, "el => getComputedStyle(el).backgroundColor")


def system_turns(page, scheme: str) -> None:
    """The system's colour scheme changes, and the page has had the change event
    (js/theme.js's listener, registered first, has run)."""
    page.evaluate(
        "() => { window.__schemeChanged = new Promise((done) => matchMedia("
        "'(prefers-color-scheme: dark)').addEventListener('change', done, { once: true })) }"
    )
    page.emulate_media(color_scheme=scheme)
    page.evaluate("() => window.__schemeChanged")


def conversation_with_code(cast, default_model) -> Conversation:
    conversation = Conversation.objects.create(owner=cast.alice, model=default_model, title="Loops")
    Message.objects.create(
        conversation=conversation, role=Message.USER, author=cast.alice, content="A loop?"
    )
    generation = Generation.objects.create(
        user=cast.alice,
        model=default_model,
        conversation=conversation,
        state=Generation.DONE,
        text=ANSWER,
    )
    Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=generation)
    return conversation


def jobs_in_each_final_state(cast, default_model) -> None:
    for state, reason in ((Job.DONE, ""), (Job.FAILED, "The worker stopped."), (Job.CANCELLED, "")):
        Job.objects.create(
            user=cast.alice,
            model=default_model,
            title=f"A {state} job",
            instruction="Summarise.",
            document="Some text.",
            state=state,
            reason=reason,
            strategy=Job.SINGLE,
        )


def test_the_pages_have_no_serious_violation_in_either_theme(stack, cast, default_model, browser):
    conversation = conversation_with_code(cast, default_model)
    context = browser.new_context(viewport={"width": 1200, "height": 850}, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(60_000)
    found = {}

    def check(name: str, ready: str) -> None:
        """axe in the system's light theme, then in its dark one (the page follows)."""
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            page.wait_for_function("s => document.documentElement.dataset.theme === s", arg=scheme)
            page.wait_for_selector(ready)
            found[f"{name}, {scheme}"] = axe_violations(page)

    page.goto(f"{stack.http_url}/login/")
    check("login", "button[type=submit]")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "alice-pass-123")
    page.click("button[type=submit]")
    page.wait_for_url(f"{stack.http_url}/")

    page.goto(f"{stack.http_url}/c/{conversation.pk}/")
    code = ".msg.assistant[data-state=done] pre code.hljs"
    page.wait_for_selector("#model-status[data-state]")  # the model's status, shown
    check("chat", code)
    # The code block wears github-dark, switched with the page.
    assert background(page, code) == "rgb(13, 17, 23)"
    page.screenshot(path=str(screenshot_dir() / "chat-dark.png"))
    page.emulate_media(color_scheme="light")
    page.wait_for_function("() => document.documentElement.dataset.theme === 'light'")
    assert background(page, code) == "rgb(255, 255, 255)"

    jobs_in_each_final_state(cast, default_model)  # now: no unread badge in the screenshot
    page.goto(f"{stack.http_url}/jobs/")
    check("jobs", ".state.failed")
    page.goto(f"{stack.http_url}/usage/")
    check("usage", "main h1")
    page.goto(f"{stack.http_url}/planner/")
    check("planner", "#planner-verdict")
    page.emulate_media(color_scheme="light")
    page.wait_for_function("() => document.documentElement.dataset.theme === 'light'")
    page.screenshot(path=str(screenshot_dir() / "planner.png"), full_page=True)
    page.goto(f"{stack.http_url}/status/")
    check("status", "#model-status-table")
    context.close()

    assert {name: v for name, v in found.items() if v} == {}


def test_the_theme_button_overrides_the_system_and_is_remembered(stack, cast, browser):
    context = browser.new_context(viewport={"width": 1200, "height": 850}, color_scheme="dark")
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{stack.http_url}/login/")
    # Set from <head>, by a blocking script: the first paint already has the theme.
    assert page.locator("head script[src$='/theme.js']:not([defer]):not([async])").count() == 1
    assert theme(page) == "dark"
    dark_bg = background(page)
    button = page.locator("#theme-toggle")
    assert button.get_attribute("aria-pressed") == "true"

    # Reached by the keyboard: the Tab after the site's name.
    page.focus(".brand")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "theme-toggle"
    page.keyboard.press("Enter")
    assert theme(page) == "light"
    assert button.get_attribute("aria-pressed") == "false"
    assert background(page) != dark_bg
    assert page.evaluate("localStorage.getItem('theme')") == "light"

    # Kept on the next page, against the system's dark.
    page.reload()
    assert theme(page) == "light"
    assert button.get_attribute("aria-pressed") == "false"
    # The system's own changes no longer move it.
    system_turns(page, "light")
    system_turns(page, "dark")
    assert theme(page) == "light"

    # Back to what the system prefers: the choice is dropped, the system leads again.
    button.click()
    assert theme(page) == "dark" and background(page) == dark_bg
    assert page.evaluate("localStorage.getItem('theme')") is None
    page.emulate_media(color_scheme="light")
    page.wait_for_function("() => document.documentElement.dataset.theme === 'light'")
    context.close()
