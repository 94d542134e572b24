"""The job pages in a real browser (Debian's Chromium), with the real worker and
model: the toast and badge when a job finishes elsewhere in the app, then the job
page with its result as markdown, progress, downloads and metrics. Screenshots land
in var/screenshots/ (`make screenshots`: docs/screenshots/)."""

from __future__ import annotations

import pytest

from inference.jobs import services
from inference.jobs.models import Job
from inference.models import LanguageModel
from tests.browser import log_in, screenshot_dir
from tests.jobs_documents import register_smollm2

pytestmark = pytest.mark.browser

SHOTS = screenshot_dir()


@pytest.fixture
def smollm2(transactional_db):
    return register_smollm2()


def test_a_job_that_finishes_elsewhere_shows_a_toast_then_its_result(stack, cast, smollm2, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = log_in(browser, stack, "alice", "alice-pass-123")  # the chat page
    page.wait_for_function("() => window.JobSocket && window.JobSocket.isOpen()")
    job = services.job_draft(
        user=cast.alice,
        instruction="Write a markdown list of the fruits in the document.",
        max_tokens=32,
        text="The orchard grows apples, pears and plums. The market sells them in May.",
        title="Fruit list",
    )
    services.job_submit(user=cast.alice, job_id=job.pk, strategy=Job.SINGLE)

    toast = page.locator(".toast.done")
    toast.wait_for(timeout=240_000)
    assert "Fruit list" in toast.inner_text() and "is done" in toast.inner_text()
    assert page.locator("#jobs-unread").inner_text() == "1"
    # The toast covers no control: not Send, not the composer.
    for control in ("#send", "#input"):
        assert not overlaps(toast.bounding_box(), page.locator(control).bounding_box()), control
    page.screenshot(path=str(SHOTS / "job-toast.png"))

    page.click(".toast a")
    page.wait_for_selector("#job[data-state=done]")
    job.refresh_from_db()
    assert page.locator("#job-phase").inner_text() == "Done"
    assert page.locator("#job-bar").get_attribute("value") is not None
    assert page.eval_on_selector("#job-bar", "bar => bar.value") == 1
    result = page.locator("#job-result")
    assert result.is_visible()
    first_words = job.result.strip().split()[0].strip("*-#`_").lower()
    assert first_words in result.inner_text().lower()
    assert page.locator("#job-result-tools a").count() == 2
    assert page.locator("#job-passes tr").count() == 1
    assert (
        f"{job.chunks.get().generation.metrics.prompt_tokens:,}"
        in page.locator("#job-passes").inner_text()
    )
    # Opening the job read the notification.
    assert page.locator("#jobs-unread").is_hidden()
    page.screenshot(path=str(SHOTS / "job-done.png"), full_page=True)

    phone = log_in(
        browser, stack, "alice", "alice-pass-123", viewport={"width": 375, "height": 800}
    )
    phone.goto(f"{stack.http_url}/jobs/{job.pk}/")
    phone.wait_for_selector("#job[data-state=done]")
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, "the job page scrolls sideways on a phone"
    phone.screenshot(path=str(SHOTS / "job-phone.png"), full_page=True)
    # The list reads at 375 px: each job is a block of labelled lines, nothing to
    # scroll sideways inside the card.
    phone.goto(f"{stack.http_url}/jobs/")
    card = phone.locator(".table-wrap")
    assert card.evaluate("c => c.scrollWidth <= c.clientWidth"), "the jobs table scrolls sideways"
    assert phone.evaluate("document.documentElement.scrollWidth") <= 375
    row = phone.locator("table.jobs tbody tr").first
    assert "Fruit list" in row.inner_text() and "Done" in row.inner_text()
    model_cell = row.locator("td[data-label=Model]")
    assert model_cell.evaluate("td => getComputedStyle(td, '::before').content") == '"Model"'
    phone.screenshot(path=str(SHOTS / "jobs-phone.png"), full_page=True)


def overlaps(a: dict, b: dict) -> bool:
    return not (
        a["x"] + a["width"] <= b["x"]
        or b["x"] + b["width"] <= a["x"]
        or a["y"] + a["height"] <= b["y"]
        or b["y"] + b["height"] <= a["y"]
    )


def test_the_job_form_offers_only_models_a_live_worker_serves(stack, cast, smollm2, browser):
    LanguageModel.objects.create(name="no-worker", path=smollm2.path)
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.goto(f"{stack.http_url}/jobs/new/")
    offered = page.locator("select[name=model] option").evaluate_all("os => os.map(o => o.value)")
    assert offered == [smollm2.name]
    # The job pages load their own stylesheet.
    assert page.locator(".jobs-page").evaluate("p => getComputedStyle(p).maxWidth") == "960px"


def test_a_job_open_on_screen_finishes_without_lighting_the_badge(stack, cast, smollm2, browser):
    job = services.job_draft(
        user=cast.alice,
        instruction="Name one fruit from the document.",
        max_tokens=8,
        text="The orchard grows apples and pears.",
        title="Watched",
    )
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.goto(f"{stack.http_url}/jobs/{job.pk}/")  # the draft, before it is queued
    services.job_submit(user=cast.alice, job_id=job.pk, strategy=Job.SINGLE)
    page.goto(f"{stack.http_url}/jobs/{job.pk}/")
    page.wait_for_function("() => window.JobSocket && window.JobSocket.isOpen()")
    # Record every time the badge shows, however briefly.
    page.evaluate(
        """() => { const badge = document.getElementById('jobs-unread');
        window.badgeShown = [];
        new MutationObserver(() => {
          if (!badge.hidden) window.badgeShown.push(badge.textContent);
        }).observe(badge, {attributes: true, childList: true, characterData: true, subtree: true});
        }"""
    )
    page.wait_for_selector("#job[data-state=done]", timeout=120_000)
    page.wait_for_timeout(300)  # the jobs.unread that answers job.seen
    assert page.evaluate("window.badgeShown") == []
    assert page.locator(".toast").count() == 0
    assert page.locator("#job-eta").inner_text() == "–"


def test_time_left_comes_from_the_measured_prompt_and_decode_rates(stack, cast, smollm2, browser):
    from django.utils import timezone

    from inference.jobs.models import JobChunk
    from inference.models import Generation
    from monitoring.models import RequestMetrics

    # The model read prompts at 100 tokens/s and wrote at 10 tokens/s lately.
    for _ in range(3):
        gen = Generation.objects.create(user=cast.bob, model=smollm2, state=Generation.DONE)
        RequestMetrics.objects.create(
            generation=gen,
            prompt_tokens=500,
            prompt_tokens_per_s=100.0,
            completion_tokens=50,
            decode_tokens_per_s=10.0,
        )
    # A queued job whose one pass reads 1,000 tokens and writes up to 50, in the
    # rows only (no task): 10 s of prompt and 5 s of answer are left.
    job = Job.objects.create(
        user=cast.alice,
        model=smollm2,
        title="Timed",
        instruction="Summarize.",
        document="x" * 100,
        document_tokens=990,
        prompt_tokens=1000,
        max_tokens=50,
        n_ctx=smollm2.n_ctx,
        strategy=Job.SINGLE,
        state=Job.QUEUED,
        queued_at=timezone.now(),
    )
    JobChunk.objects.create(job=job, index=0, start=0, end=100, prompt_tokens=1000)
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.goto(f"{stack.http_url}/jobs/{job.pk}/")
    assert page.locator("#job-eta").inner_text() == "about 15 s"
    page.screenshot(path=str(SHOTS / "job-waiting.png"), full_page=True)


def test_the_new_job_form_counts_as_the_user_types_and_an_over_length_draft_is_red(
    stack, cast, smollm2, browser
):
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.goto(f"{stack.http_url}/jobs/new/")
    counts = []
    page.on("request", lambda r: counts.append(r.url) if r.url.endswith("/jobs/count/") else None)
    page.fill("#id_instruction", "List the fruits.")
    page.fill("#id_max_tokens", str(smollm2.n_ctx - 100))  # 100 tokens left for the prompt
    # Typed key by key, faster than the debounce: counted once, after the last key.
    page.locator("#id_text").press_sequentially("apples, pears", delay=30)
    live = page.locator("#live-count")
    page.wait_for_function("() => /tokens/.test(document.getElementById('live-count').innerText)")
    assert len(counts) == 1
    assert "it fits" in live.inner_text()
    # A paste is counted too; this one no longer fits.
    page.fill("#id_text", "apples, pears and plums grow in the orchard by the river. " * 8)
    page.wait_for_function("() => /over by/.test(document.getElementById('live-count').innerText)")
    shown = live.inner_text()
    # The button still counts, into a draft, and agrees with what was shown live.
    page.click("button.primary")
    page.wait_for_selector("#fit-bar")
    job = Job.objects.get(user=cast.alice, state=Job.DRAFT)
    assert f"The prompt is {job.prompt_tokens:,} tokens" in shown
    assert not job.fits
    # The draft's bar is in the error colour and says over, beside the red text.
    bar = page.locator("#fit-bar")
    assert bar.evaluate("b => getComputedStyle(b).accentColor") == "rgb(201, 42, 42)"
    over = job.prompt_tokens - (job.n_ctx - job.max_tokens)
    assert page.locator("#fit-bar-label").inner_text().startswith(f"Over by {over:,} tokens")


def test_a_result_cut_at_its_token_limit_says_so(stack, cast, smollm2, browser):
    from django.utils import timezone

    from inference.jobs.models import JobChunk
    from inference.models import Generation

    # A finished one-pass job whose answer stopped at max_tokens (rows only).
    job = Job.objects.create(
        user=cast.alice,
        model=smollm2,
        title="Cut",
        instruction="Summarize.",
        document="x" * 100,
        document_tokens=90,
        prompt_tokens=100,
        max_tokens=64,
        n_ctx=smollm2.n_ctx,
        strategy=Job.SINGLE,
        state=Job.DONE,
        result="The first part of a long",
        queued_at=timezone.now(),
        finished_at=timezone.now(),
    )
    gen = Generation.objects.create(
        user=cast.alice, model=smollm2, state=Generation.DONE, finish_reason="length"
    )
    JobChunk.objects.create(
        job=job, index=0, start=0, end=100, prompt_tokens=100, state=JobChunk.DONE, generation=gen
    )
    page = log_in(browser, stack, "alice", "alice-pass-123")
    page.goto(f"{stack.http_url}/jobs/{job.pk}/")
    notice = page.locator("#job-result-cut")
    assert notice.is_visible()
    assert "stopped at the 64-token limit" in notice.inner_text()
    assert page.locator("#job-passes td").nth(1).inner_text() == "done, cut at the token limit"
    # An answer that ended by itself says nothing of the kind.
    Generation.objects.filter(pk=gen.pk).update(finish_reason="stop")
    page.reload()
    assert not page.locator("#job-result-cut").is_visible()
    assert page.locator("#job-passes td").nth(1).inner_text() == "done"
