"""The GPU page in a real browser: history and live charts drawn, updated over the
socket from a telemetry thread (NVML substituted), a phone-width usage page, the
usage pages listing requests that never finished, and the alerts page at phone
width, used with the keyboard."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from monitoring import telemetry
from tests.browser import log_in, screenshot_dir
from tests.jobs_documents import register_smollm2
from tests.test_monitoring_pages import unfinished_generations

pytestmark = pytest.mark.browser


@pytest.fixture
def staff(transactional_db):
    return get_user_model().objects.create_user(
        "gpu-watcher", password="watch-pass-123", is_staff=True
    )


def test_the_gpu_page_draws_history_and_live_charts(browser, stack, staff, fake_gpus, redis_client):
    redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())
    telemetry.sample_once("browser-host")  # history, and the "now" table
    page = log_in(browser, stack, "gpu-watcher", "watch-pass-123")
    sampler = telemetry.HostTelemetry(interval_s=0.3, host="browser-host").start()
    try:
        page.goto(f"{stack.http_url}/gpus/")
        assert page.locator("#history-charts canvas").count() == 2
        assert page.locator("#live-charts canvas").count() == 2
        # Live points arrive over the socket and are appended to the charts.
        page.wait_for_function(
            "() => Object.values(Chart.instances).some(c => c.canvas.closest('#live-charts')"
            " && c.data.labels.length >= 3)",
            timeout=20_000,
        )
        page.screenshot(path=str(screenshot_dir() / "gpus.png"), full_page=True)
    finally:
        sampler.stop()
        redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())
    assert "browser-host" in page.inner_text("#gpu-now")


def test_the_usage_page_fits_a_phone(browser, stack, cast):
    page = log_in(browser, stack, "alice", "alice-pass-123", viewport={"width": 375, "height": 800})
    page.goto(f"{stack.http_url}/usage/")
    assert page.locator("canvas").count() == 3
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_the_usage_pages_show_requests_that_never_finished(browser, stack, staff, cast):
    gens = unfinished_generations(cast.alice, register_smollm2())
    for username, password, path in (
        ("alice", "alice-pass-123", "/usage/"),
        ("gpu-watcher", "watch-pass-123", "/usage/admin/"),
    ):
        page = log_in(browser, stack, username, password)
        response = page.goto(f"{stack.http_url}{path}")
        assert response.status == 200, path
        for name, gen in gens.items():
            row = page.locator(f"tr:has(a[href='/usage/requests/{gen.pk}/'])")
            cells = row.locator("td").all_inner_texts()
            assert cells[-5] == gen.get_state_display(), (path, name)
            assert cells[-2] == "—", (path, name)  # no time to first token
        if path == "/usage/":
            page.screenshot(path=str(screenshot_dir() / "usage.png"), full_page=True)


def test_the_alerts_page_fits_a_phone_and_acknowledges_from_the_keyboard(browser, stack, staff):
    from django.utils import timezone

    from monitoring.models import Alert

    now = timezone.now()
    alert = Alert.objects.create(
        key="worker_gone:phone-host:4242",
        kind=Alert.WORKER_GONE,
        subject="Worker phone-host:4242 (smollm2-135m) is gone",
        message="The smollm2-135m worker phone-host:4242 (cpu) has missed three heartbeats; "
        "last seen 2026-12-04 21:14:03 UTC, ready. It ends when a worker for "
        "smollm2-135m starts on phone-host.",
        opened_at=now,
        fired_at=now,
        last_sent_at=now,
        times_sent=1,
    )
    viewport = {"width": 375, "height": 800}
    page = log_in(browser, stack, "gpu-watcher", "watch-pass-123", viewport=viewport)
    page.goto(f"{stack.http_url}/alerts/")
    assert "phone-host:4242" in page.inner_text("#open-alerts")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    # Tab from the top of the page to the Acknowledge button, then Enter.
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent.trim()") == "Acknowledge":
            break
    else:
        raise AssertionError("the Acknowledge button is not reachable with Tab")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "acknowledged by gpu-watcher" in page.inner_text(f"#alert-{alert.pk}")
    alert.refresh_from_db()
    assert alert.acknowledged_at is not None
