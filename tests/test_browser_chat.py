"""The chat page in a real browser (Debian's Chromium) against the live stack, with
the real worker and model. Screenshots: var/screenshots/ (`make screenshots`: docs/)."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from inference.models import Conversation, Generation, Message
from tests.browser import log_in, screenshot_dir

pytestmark = pytest.mark.browser

SHOTS = screenshot_dir()
LONG = "Write a very long story about a dragon who learns to bake bread, with many chapters."


def send(page, text: str, max_tokens: int | None = None):
    if max_tokens is not None:
        # A conversation's settings are folded: open them to change the next answer's.
        page.evaluate("document.getElementById('chat-settings').open = true")
        page.fill("#p-max_tokens", str(max_tokens))
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_answer(page):
    return page.locator(".msg.assistant").last


def wait_state(page, state: str, timeout_ms: int = 120_000):
    page.wait_for_selector(f".msg.assistant:last-child[data-state={state}]", timeout=timeout_ms)


def wait_for_text(page, min_chars: int = 20):
    page.wait_for_function(
        "n => { const a = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return a && a.dataset.state === 'running'"
        " && a.querySelector('.body').innerText.length >= n }",
        arg=min_chars,
        timeout=120_000,
    )


def conversation_of(page) -> Conversation:
    conversation_id = int(page.url.rstrip("/").split("/")[-1])
    return Conversation.objects.get(pk=conversation_id)


def test_a_user_logs_in_chats_and_sees_the_answer_stream(stack, cast, default_model, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.screenshot(path=str(SHOTS / "new-chat.png"))
    send(page, "Give me three tips for writing clear Python code.", max_tokens=200)
    wait_for_text(page, 10)  # seen while running: it streams
    wait_state(page, "done")
    gen = Generation.objects.get(conversation=conversation_of(page))
    assert gen.state == Generation.DONE and gen.text
    # The header names the new conversation as the server titled it, without a reload.
    assert page.locator("#chat-title").inner_text() == gen.conversation.title
    footer = last_answer(page).locator(".footer").inner_text()
    assert f"{gen.metrics.completion_tokens} tokens" in footer
    assert f"context {gen.metrics.context_used} / {gen.metrics.n_ctx}" in footer
    assert page.locator("#context-meter").is_visible()
    page.screenshot(path=str(SHOTS / "chat.png"), full_page=True)
    # After a reload the conversation is still there.
    page.reload()
    page.wait_for_selector(".msg.assistant[data-state=done]")
    assert page.locator(".msg.user .body").inner_text().startswith("Give me three tips")


def test_a_new_chat_is_titled_to_a_whole_word_with_its_header_and_tab_title_at_once(
    stack, cast, default_model, browser
):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    send(
        page,
        "Please summarise the history of the Hanseatic League and its trading posts "
        "throughout the Baltic, in one line.",
        max_tokens=4,
    )
    wait_state(page, "done")
    expected = "Please summarise the history of the Hanseatic League and its trading posts…"
    assert conversation_of(page).title == expected

    def shown() -> tuple[str, str]:
        return (
            page.locator("#chat-title").inner_text(),
            page.locator("#my-conversations li.active").inner_text(),
        )

    assert shown() == (expected, expected)
    # The header is the conversation's, as a reload shows it: its model line, the
    # Manage menu (rename, share, delete) and the browser tab's title.
    page.locator(".conv-actions summary").click()
    rename = page.locator(".conv-actions input[name=title]")
    assert rename.input_value() == expected
    assert page.locator(".conv-bar").inner_text().startswith(default_model.name)
    assert page.locator(".conv-actions a", has_text="Delete").is_visible()
    assert page.title() == f"{expected} · {settings.SITE_NAME}"
    page.reload()
    wait_state(page, "done")
    assert shown() == (expected, expected), "after a reload"
    assert page.title() == f"{expected} · {settings.SITE_NAME}"


def focused_id(page) -> str:
    return page.evaluate("document.activeElement.id || document.activeElement.className")


def test_stop_keeps_the_text_and_the_keyboard_stays_in_the_message_box(
    stack, cast, default_model, browser
):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    # The message box has the focus on load; the first Tab reaches a skip link to it.
    assert focused_id(page) == "input"
    first = page.evaluate(
        "document.querySelector('a[href], button, input, textarea, select').className"
    )
    assert first == "skip-link"
    page.focus(".skip-link")
    assert page.locator(".skip-link").bounding_box()["y"] >= 0, "shown when focused"
    page.keyboard.press("Enter")
    assert focused_id(page) == "input"
    send(page, LONG, max_tokens=2000)
    wait_for_text(page, 40)
    page.click("#stop")
    wait_state(page, "cancelled")
    gen = Generation.objects.get(conversation=conversation_of(page))
    assert gen.state == Generation.CANCELLED
    assert len(gen.text) >= 40
    assert "stopped" in last_answer(page).locator(".footer").inner_text()
    assert focused_id(page) == "input", "focus went back to the message box after Stop"
    # Edit and Regenerate are targets a finger or a shaky hand can hit.
    for target in (page.locator(".msg.user .edit"), last_answer(page).locator(".regenerate")):
        box = target.bounding_box()
        assert box["height"] >= 44 and box["width"] >= 44, box


def test_stop_while_queued_says_it_stopped_before_it_started(stack, cast, default_model, browser):
    # An answer still waiting for a sequence: its row is queued and no worker has
    # taken its task (as when every sequence of the worker is busy).
    conversation = Conversation.objects.create(
        owner=cast.alice, model=default_model, title="Waiting"
    )
    question = [{"role": "user", "content": "Are you there?"}]
    Message.objects.create(
        conversation=conversation, role=Message.USER, author=cast.alice, content="Are you there?"
    )
    gen = Generation.objects.create(
        user=cast.alice, model=default_model, conversation=conversation, input_messages=question
    )
    Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=gen)
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.goto(f"{stack.http_url}/c/{conversation.pk}/")
    wait_state(page, "queued")
    assert last_answer(page).locator(".body").inner_text().startswith("queued — position 1")
    # Its task never reached the broker: past GENERATION_STRANDED_AFTER_S it says so
    # (the reaper sends it again, or fails it with why), with no made-up estimate.
    Generation.objects.filter(pk=gen.pk).update(queued_at=timezone.now() - timedelta(minutes=2))
    page.reload()
    wait_state(page, "queued")
    waiting = last_answer(page).locator(".body").inner_text()
    assert "its place in the queue was lost, sending it again" in waiting
    assert "about" not in waiting

    page.click("#stop")
    wait_state(page, "cancelled")
    gen.refresh_from_db()
    assert gen.state == Generation.CANCELLED and gen.started_at is None

    def shown() -> tuple[str, str]:
        answer = last_answer(page)
        return answer.locator(".body").inner_text(), answer.locator(".footer").inner_text()

    assert shown() == ("Stopped before it started.", "stopped")
    page.reload()
    wait_state(page, "cancelled")
    assert shown() == ("Stopped before it started.", "stopped"), "after a reload"


def test_escape_stops_the_answer(stack, cast, default_model, browser):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    send(page, LONG, max_tokens=2000)
    wait_for_text(page, 20)
    page.keyboard.press("Escape")
    wait_state(page, "cancelled")


def test_regenerate_replaces_the_last_answer(stack, cast, default_model, browser):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    send(page, "Name a fruit.", max_tokens=20)
    wait_state(page, "done")
    conversation = conversation_of(page)
    first = Generation.objects.get(conversation=conversation)
    last_answer(page).locator(".regenerate").click()
    page.wait_for_function(
        "id => [...document.querySelectorAll('.msg.assistant')].length === 1 &&"
        " document.querySelector('.msg.assistant').dataset.id != id",
        arg=str(first.message.pk),
    )
    wait_state(page, "done")
    assert conversation.generations.count() == 2
    assert Message.objects.get(generation=first).superseded_at is not None
    assert conversation.messages.current().count() == 2


def test_editing_a_message_replaces_the_later_turns(stack, cast, default_model, browser):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    send(page, "Name a colour.", max_tokens=16)
    wait_state(page, "done")
    page.locator(".msg.user .edit").click()
    page.fill(".edit-box textarea", "Name an animal.")
    page.click(".edit-box button.primary")
    page.wait_for_selector(".msg.user .tag:has-text('edited')")
    wait_state(page, "done")
    conversation = conversation_of(page)
    current = list(conversation.messages.current())
    assert [m.role for m in current] == ["user", "assistant"]
    assert current[0].content == "Name an animal." and current[0].edited_from is not None
    assert page.locator(".msg.user .body").inner_text() == "Name an animal."


def test_a_reload_in_the_middle_of_an_answer_continues_it(stack, cast, default_model, browser):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    send(page, LONG, max_tokens=250)
    wait_for_text(page, 60)
    before = last_answer(page).locator(".body").inner_text()
    page.reload()
    page.wait_for_selector(".msg.assistant")
    after_reload = last_answer(page).locator(".body").inner_text()
    assert after_reload.startswith(before[:40])
    wait_state(page, "done")
    gen = Generation.objects.get(conversation=conversation_of(page))
    assert gen.state == Generation.DONE and len(gen.text) > len(before)
    rendered = last_answer(page).locator(".body").inner_text()
    assert rendered.split()[-1].strip("*_`.") in gen.text


def test_a_team_mate_watches_the_live_stream(stack, cast, default_model, browser):
    conversation = Conversation.objects.create(
        owner=cast.alice,
        team=cast.red,
        model=default_model,
        title="Team plans",
        params={"max_tokens": 300},
    )
    alice = log_in(browser, stack, "alice", "alice-pass-123")
    bob = log_in(browser, stack, "bob", "bob-pass-123")
    alice.goto(f"{stack.http_url}/c/{conversation.pk}/")
    bob.goto(f"{stack.http_url}/c/{conversation.pk}/")
    assert "Team plans" in bob.locator(".sidebar").inner_text()
    for page in (alice, bob):
        page.wait_for_selector("#conn-status.ok", state="attached")
    # Each sees who else has the conversation open.
    # (A function, not an expression: the page's CSP forbids eval.)
    here = "w => document.getElementById('watchers').textContent === w"
    alice.wait_for_function(here, arg="· bob is here")
    bob.wait_for_function(here, arg="· alice is here")
    # The owner changes the settings of the next answer; a team-mate cannot.
    assert alice.locator("#chat-settings > summary").inner_text() == "Settings for the next answer"
    assert bob.locator("#p-max_tokens").is_disabled()
    assert "Only alice" in bob.locator("#chat-settings").text_content()
    send(alice, LONG, max_tokens=100)
    wait_for_text(bob, 30)  # Bob sees it while it is being written
    bob.screenshot(path=str(SHOTS / "team-mate-watching.png"))
    # Bob may stop it, and Alice is told who did.
    bob.click("#stop")
    wait_state(alice, "cancelled")
    assert "stopped by bob" in last_answer(alice).locator(".footer").inner_text()
    wait_state(bob, "cancelled")
    assert last_answer(bob).locator(".footer").inner_text().startswith("stopped ·")
    gen = Generation.objects.get(conversation=conversation)
    assert gen.params["max_tokens"] == 100 and gen.stopped_by == cast.bob
    bob_text = last_answer(bob).locator(".body").inner_text()
    assert bob_text.split()[0].strip("*#_`") in gen.text
    assert bob.locator(".msg.user .meta").inner_text().startswith("alice")
    # Any member may post the next message, and it shows who wrote it.
    send(bob, "Thanks! One more line please.")
    alice.wait_for_function("() => document.querySelectorAll('.msg.user').length === 2")
    wait_state(alice, "done")
    authors = alice.locator(".msg.user .meta").all_inner_texts()
    assert authors[0].startswith("alice") and authors[1].startswith("bob")


XSS_CORPUS = "\n\n".join(
    [
        "```html\n<script>window.__xss = 'code'</script>\n```",
        "<script>window.__xss = 'script'</script>",
        "<img src=x onerror=\"window.__xss = 'img'\">",
        "<svg onload=\"window.__xss = 'svg'\"></svg>",
        "<iframe srcdoc=\"<script>parent.__xss = 'iframe'</script>\"></iframe>",
        "[click me](javascript:window.__xss='md-link')",
        "<a href=\"javascript:window.__xss='a-href'\">a link</a>",
        "<details open ontoggle=\"window.__xss = 'details'\">x</details>",
        "![img](x\" onerror=\"window.__xss='md-img')",
        "<math><mtext><table><mglyph><style><img src=x onerror=\"window.__xss='mxss'\">",
        "<form action=\"javascript:window.__xss='form'\"><button>go</button></form>",
    ]
)


def test_script_in_model_output_never_runs(stack, cast, default_model, browser):
    conversation = Conversation.objects.create(
        owner=cast.alice, model=default_model, title="XSS corpus"
    )
    Message.objects.create(
        conversation=conversation, role=Message.USER, author=cast.alice, content="hi"
    )
    gen = Generation.objects.create(
        user=cast.alice,
        model=default_model,
        conversation=conversation,
        state=Generation.DONE,
        text=XSS_CORPUS,
    )
    Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=gen)
    page = log_in(browser, stack, "alice", "alice-pass-123")
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{stack.http_url}/c/{conversation.pk}/")
    page.wait_for_selector(".msg.assistant[data-state=done]")
    body = last_answer(page).locator(".body")
    for link in body.locator("a").all():
        link.click(modifiers=["Control"], no_wait_after=True)
    page.wait_for_timeout(500)
    assert page.evaluate("window.__xss") is None
    assert dialogs == []
    dangerous = body.evaluate(
        """el => [...el.querySelectorAll('*')].flatMap(node => [
            ...['SCRIPT', 'IFRAME', 'OBJECT', 'EMBED', 'FORM', 'STYLE'].includes(node.tagName)
                ? [node.tagName] : [],
            ...[...node.attributes]
                .filter(a => a.name.startsWith('on') || /^\\s*javascript:/i.test(a.value))
                .map(a => node.tagName + ' ' + a.name + '=' + a.value),
        ])"""
    )
    assert dangerous == []
    # The code block shows the script as text, highlighted, with a copy button.
    assert "window.__xss = 'code'" in body.locator("pre code").inner_text()
    assert body.locator("pre .copy").count() == 1


def test_the_context_meter_keeps_the_chats_style(stack, cast, default_model, browser):
    from monitoring.models import RequestMetrics

    conversation = Conversation.objects.create(
        owner=cast.alice, model=default_model, title="Measured"
    )
    Message.objects.create(
        conversation=conversation, role=Message.USER, author=cast.alice, content="hi"
    )
    gen = Generation.objects.create(
        user=cast.alice,
        model=default_model,
        conversation=conversation,
        state=Generation.DONE,
        text="Hello there.",
    )
    RequestMetrics.objects.create(
        generation=gen, prompt_tokens=30, completion_tokens=4, n_ctx=8192, context_used=34
    )
    Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=gen)
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.goto(f"{stack.http_url}/c/{conversation.pk}/")
    meter = page.locator("#context-meter")
    meter.wait_for()
    assert meter.inner_text() == "context 34 / 8,192"
    # The job pages' stylesheet is theirs: its bars must not restyle this meter.
    assert meter.evaluate("m => getComputedStyle(m).width") == "160px"
    assert page.locator("link[href$='css/jobs.css']").count() == 0


def test_someone_outside_the_team_gets_nothing(stack, cast, default_model, browser):
    conversation = Conversation.objects.create(
        owner=cast.alice, team=cast.red, model=default_model, title="Red only"
    )
    page = log_in(browser, stack, "charlie", "charlie-pass-123")
    assert "Red only" not in page.locator(".sidebar").inner_text()
    response = page.goto(f"{stack.http_url}/c/{conversation.pk}/")
    assert response.status == 404
    assert "Red only" not in page.content()


def test_the_chat_page_fits_a_phone(stack, cast, default_model, browser):
    page = log_in(browser, stack, "alice", "alice-pass-123", viewport={"width": 375, "height": 740})
    send(page, "Say hi in five words.", max_tokens=16)
    wait_state(page, "done")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the page is {width}px wide on a 375px phone"
    page.screenshot(path=str(SHOTS / "chat-phone.png"))
    page.click("#sidebar-toggle")
    assert page.locator("#sidebar").is_visible()


def test_the_models_status_goes_from_ready_to_busy_and_back_while_an_answer_streams(
    stack, cast, default_model, browser
):
    page = log_in(browser, stack, "bob", "bob-pass-123", viewport={"width": 375, "height": 740})
    page.wait_for_selector("#model-status[data-state=ready]")
    assert page.locator("#model-status-text").inner_text() == "Ready"
    assert page.locator("#model-status-name").inner_text().strip() == f"{default_model.name}:"
    # Every state the widget shows from now on, in order, and whether the answer was
    # streaming (running, with text) while it showed it.
    page.evaluate(
        """() => {
          const el = document.getElementById('model-status');
          window.seen = [el.dataset.state];
          window.busyWhileStreaming = false;
          new MutationObserver(() => {
            if (window.seen.at(-1) !== el.dataset.state) window.seen.push(el.dataset.state);
          }).observe(el, {attributes: true, attributeFilter: ['data-state']});
          new MutationObserver(() => {
            const a = [...document.querySelectorAll('.msg.assistant')].pop();
            if (a && a.dataset.state === 'running' && a.querySelector('.body').innerText
                && el.dataset.state === 'busy') window.busyWhileStreaming = true;
          }).observe(document.getElementById('messages'),
                     {subtree: true, childList: true, characterData: true});
        }"""
    )
    send(page, "Count slowly from one to fifty, one number per line.", max_tokens=48)
    wait_for_text(page, 10)
    wait_state(page, "done")
    page.wait_for_selector("#model-status[data-state=ready]")
    assert page.evaluate("window.seen") == ["ready", "busy", "ready"]
    assert page.evaluate("window.busyWhileStreaming"), "busy was not shown while it streamed"
    # Screen readers hear availability changes only, not each answer's busy and ready.
    spoken = page.locator("#model-status-spoken")
    assert spoken.get_attribute("aria-live") == "polite" and spoken.inner_text() == ""
    assert page.evaluate("document.documentElement.scrollWidth") <= 375

    # /status/, reached from the phone menu with the keyboard: the same state.
    page.focus("#nav-toggle")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Status"
    page.keyboard.press("Enter")
    page.wait_for_url(f"{stack.http_url}/status/")
    row = page.locator(f"#model-status-table tr[data-model={default_model.name}]")
    assert row.get_attribute("data-state") == "ready"
    assert "ms" in row.inner_text()  # the median time to first token of recent answers
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_a_long_title_and_the_menu_fit_a_phone(stack, cast, default_model, browser):
    title = "Notes on the quarterly planning of the infrastructure migration and its budget"
    conversation = Conversation.objects.create(owner=cast.alice, model=default_model, title=title)
    Message.objects.create(
        conversation=conversation, role=Message.USER, author=cast.alice, content="hi"
    )
    page = log_in(browser, stack, "alice", "alice-pass-123", viewport={"width": 375, "height": 740})
    page.goto(f"{stack.http_url}/c/{conversation.pk}/")
    page.wait_for_selector(".msg.user")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the page is {width}px wide on a 375px phone"
    send_box = page.locator("#send").bounding_box()
    assert send_box["x"] + send_box["width"] <= 375, "Send is off-screen"
    assert page.locator("#chat-title").inner_text().startswith("Notes on the")

    # The navigation is a menu behind one labelled button, opened from the keyboard.
    toggle = page.locator("#nav-toggle")
    links = page.locator("#topnav a")
    assert toggle.get_attribute("aria-expanded") == "false"
    assert toggle.get_attribute("aria-controls") == "topnav"
    assert not links.first.is_visible()
    toggle.focus()
    page.keyboard.press("Enter")
    assert toggle.get_attribute("aria-expanded") == "true"
    shown = [link.bounding_box() for link in links.all()]
    assert all(box and box["x"] >= 0 and box["x"] + box["width"] <= 375 for box in shown)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Chat"
    # The page's own Escape (chat.js: stop the answer) must not also see this one.
    page.evaluate(
        "window.escapesSeen = 0; document.addEventListener('keydown', e => {"
        " if (e.key === 'Escape') window.escapesSeen++; })"
    )
    page.keyboard.press("Escape")
    assert toggle.get_attribute("aria-expanded") == "false"
    assert not links.first.is_visible()
    assert page.evaluate("document.activeElement.id") == "nav-toggle"
    assert page.evaluate("window.escapesSeen") == 0
    page.keyboard.press("Escape")  # with the menu closed, Escape is the page's again
    assert page.evaluate("window.escapesSeen") == 1


def test_an_answer_cut_at_its_token_limit_says_so_and_continues(
    stack, cast, default_model, browser
):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    send(page, LONG, max_tokens=8)
    wait_state(page, "done")
    first = Generation.objects.get(conversation=conversation_of(page))
    assert first.finish_reason == "length"
    assert "stopped at the 8-token limit" in last_answer(page).locator(".footer").inner_text()
    # Continue: the same answer goes on where it stopped, in its place.
    last_answer(page).locator(".continue").click()
    page.wait_for_function(
        "id => [...document.querySelectorAll('.msg.assistant')].length === 1 &&"
        " document.querySelector('.msg.assistant').dataset.id != id",
        arg=str(first.message.pk),
    )
    wait_state(page, "done")
    second = Generation.objects.exclude(pk=first.pk).get(conversation=first.conversation)
    assert second.text.startswith(first.text) and len(second.text) > len(first.text)
    assert second.metrics.completion_tokens == 8
    assert second.metrics.prompt_tokens > first.metrics.prompt_tokens  # it read the start
    shown = last_answer(page).locator(".body").inner_text()
    assert shown.split()[-1].strip("*_`.,") in second.text[len(first.text) :]
    assert "stopped at the 8-token limit" in last_answer(page).locator(".footer").inner_text()
    page.reload()
    wait_state(page, "done")
    assert last_answer(page).locator(".continue").is_visible(), "offered again after a reload"


# At temperature 0 the model answers this with several blocks: paragraphs, a list.
BLOCKS = "Write a pancake recipe with a title, a list of ingredients and numbered steps."


def test_a_streaming_answer_keeps_its_finished_blocks_and_an_inline_cursor(
    stack, cast, default_model, browser
):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    # Only the status is a live region: a screen reader does not re-read the list.
    assert page.locator("#messages").get_attribute("aria-live") is None
    page.fill("#p-temperature", "0")
    send(page, BLOCKS, max_tokens=160)
    # Once a block is finished, its element stays as it is while the next grows.
    page.wait_for_function(
        "() => { const a = [...document.querySelectorAll('.msg.assistant')].pop();"
        " if (!a || a.dataset.state !== 'running') return false;"
        " const blocks = [...a.querySelectorAll('.body > *, .body > .md-part > *')]"
        "   .filter(el => !el.classList.contains('md-part'));"
        " if (blocks.length < 2) return false;"
        " window.__first = blocks[0];"
        " window.__length = a.querySelector('.body').innerText.length;"
        " return true }",
        timeout=60_000,
    )
    cursor = page.evaluate(
        """() => {
            const c = document.querySelector('.msg.assistant:last-child .cursor');
            if (!c) return null;
            const range = document.createRange();
            range.setStart(c.parentElement, 0);
            range.setEndBefore(c);
            const rects = [...range.getClientRects()].filter(r => r.width > 0);
            return {parent: c.parentElement.tagName, top: c.getBoundingClientRect().top,
                    textTop: rects.length ? rects[rects.length - 1].top : null};
        }"""
    )
    # Inside the block it ends (not after it, in the answer's own box), on its last line.
    assert cursor is not None and cursor["parent"] != "DIV" and cursor["textTop"] is not None
    assert abs(cursor["top"] - cursor["textTop"]) < 4, "the cursor is on the text's last line"
    page.wait_for_function(
        "() => { const a = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return a.dataset.state !== 'running' ||"
        " a.querySelector('.body').innerText.length > window.__length + 40 }"
    )
    running = last_answer(page).get_attribute("data-state") == "running"
    assert page.evaluate("window.__first.isConnected") or not running, (
        "the finished block was rendered again"
    )
    wait_state(page, "done")
    assert page.locator("#answer-status").inner_text() == "Answer finished."
    assert last_answer(page).locator(".cursor").count() == 0
    # A 4,000-token answer fed frame by frame: the work of a frame at the end is
    # about that at the start (markdown sanitized per frame), not 4,000 tokens' worth.
    work = page.evaluate(
        """() => {
            const words = 'the quick brown fox jumps over a lazy dog by the river'.split(' ');
            let text = '';
            for (let i = 0; text.length < 16000; i++) {
                text += (i % 7 === 6 ? '\\n\\n' : '') + words[i % words.length] + ' ';
            }
            const box = document.createElement('div');
            const stream = new Markdown.Stream(box);
            const sanitize = DOMPurify.sanitize;
            const frames = [];
            DOMPurify.sanitize = function (html, options) {
                frames[frames.length - 1].chars += html.length;
                return sanitize.call(DOMPurify, html, options);
            };
            try {
                for (let end = 20; end <= text.length + 19; end += 20) {
                    frames.push({chars: 0});
                    const t0 = performance.now();
                    stream.update(text.slice(0, end));
                    frames[frames.length - 1].ms = performance.now() - t0;
                }
            } finally { DOMPurify.sanitize = sanitize; }
            const whole = document.createElement('div');
            const t0 = performance.now();
            whole.innerHTML = Markdown.render(text);  // what each frame cost before
            const wholeMs = performance.now() - t0;
            const mean = (list, key) => list.reduce((s, f) => s + f[key], 0) / list.length;
            return {same: box.innerText === whole.innerText, wholeMs: wholeMs,
                    startChars: mean(frames.slice(0, 50), 'chars'),
                    endChars: mean(frames.slice(-50), 'chars'),
                    startMs: mean(frames.slice(0, 50), 'ms'),
                    endMs: mean(frames.slice(-50), 'ms')};
        }"""
    )
    print(
        f"render per frame, 4,000-token answer: start {work['startMs']:.3f} ms "
        f"({work['startChars']:.0f} chars), end {work['endMs']:.3f} ms "
        f"({work['endChars']:.0f} chars); the whole answer at once {work['wholeMs']:.1f} ms"
    )
    assert work["same"], "the streamed rendering ends as the whole answer's"
    assert work["endChars"] < 4 * max(work["startChars"], 100), work


def test_a_long_conversation_opens_at_its_latest_answer(stack, cast, default_model, browser):
    conversation = Conversation.objects.create(
        owner=cast.alice, model=default_model, title="Long one"
    )
    for turn in range(12):
        Message.objects.create(
            conversation=conversation, role=Message.USER, author=cast.alice, content=f"Q{turn}"
        )
        gen = Generation.objects.create(
            user=cast.alice,
            model=default_model,
            conversation=conversation,
            state=Generation.DONE,
            text="\n\n".join(f"Answer {turn}, paragraph {p}: " + "words " * 60 for p in range(4)),
        )
        Message.objects.create(conversation=conversation, role=Message.ASSISTANT, generation=gen)
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.goto(f"{stack.http_url}/c/{conversation.pk}/")
    page.wait_for_selector(".msg.assistant:last-child[data-state=done]")
    page.wait_for_function(
        "() => window.scrollY + window.innerHeight >= document.body.scrollHeight - 4"
        " && document.body.scrollHeight > 3 * window.innerHeight",
        timeout=5_000,
    )
    assert last_answer(page).locator(".body").is_visible()


def test_a_new_api_key_copies_over_plain_http_with_a_working_example(
    stack, cast, default_model, browser
):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    # As over plain HTTP across a LAN: no Clipboard API in the page.
    page.add_init_script("Object.defineProperty(navigator, 'clipboard', {value: undefined})")
    page.goto(f"{stack.http_url}/account/keys/")
    page.fill("input[name=name]", "shell")
    page.click("form.card button.primary")
    secret = page.locator("#new-key-secret").inner_text()
    reader = page.context.new_page()
    reader.goto(f"{stack.http_url}/account/keys/")

    def clipboard() -> str:
        return reader.evaluate("navigator.clipboard.readText()")

    page.click("button[data-copy='#new-key-secret']")
    page.wait_for_selector("button[data-copy='#new-key-secret']:has-text('Copied')")
    assert clipboard() == secret
    page.click("button[data-copy='#new-key-example']")
    example = clipboard()
    assert example.startswith("curl ") and secret in example
    # The example, run as it was copied, gets an answer from the model.
    answer = subprocess.run(
        ["bash", "-c", example + " --silent --show-error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["choices"][0]["message"]["content"]
