"""The GPU page, its alerts and its live socket, with the NVML boundary substituted."""

import json
import time
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from websockets.sync.client import connect

from monitoring import telemetry
from monitoring.models import GpuMinute
from tests.conftest import session_cookie
from tests.fake_nvml import GIB, reading


@pytest.fixture
def clean_redis(redis_client):
    redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())
    yield
    redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user("stella", is_staff=True)


def test_the_gpu_page_shows_each_gpu_and_its_processes(client, staff, fake_gpus, clean_redis):
    telemetry.sample_once("gpu-host-a")
    client.force_login(staff)
    html = client.get("/gpus/").content.decode()
    assert 'data-gpu="gpu-host-a/0"' in html and 'data-gpu="gpu-host-a/1"' in html
    assert "20.00 GiB / 80.00 GiB" in html
    assert "18.00 GiB" in html, "the process table shows each process's memory"
    assert "no NVIDIA GPU" not in html


def test_the_gpu_page_says_no_nvidia_gpu_never_zeros(client, staff, no_gpu, clean_redis):
    telemetry.sample_once("cpu-host")
    client.force_login(staff)
    html = client.get("/gpus/").content.decode()
    assert "cpu-host</b>: no NVIDIA GPU" in html
    assert "0.00 GiB" not in html and 'data-gpu="' not in html


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"temperature_c": 91.0}, "is at 91 °C"),
        ({"throttle_reasons": ["hw_thermal"]}, "throttling its clocks: hw_thermal"),
        ({"throttle_reasons": ["sw_power_cap"]}, "throttling its clocks: sw_power_cap"),
        ({"memory_used_bytes": 78 * GIB}, "% of its memory free"),
    ],
)
def test_the_gpu_page_and_overview_raise_alerts(
    client, staff, fake_gpus, clean_redis, settings, overrides, expected
):
    settings.GPU_ALERT_TEMPERATURE_C = 85
    settings.GPU_ALERT_VRAM_HEADROOM_PCT = 5
    fake_gpus.readings[1] = reading(1, **overrides)
    telemetry.sample_once("hot-host")
    client.force_login(staff)
    for url in ("/gpus/", "/usage/admin/"):
        html = client.get(url).content.decode()
        assert "hot-host GPU 1" in html and expected in html, url
        assert "hot-host GPU 0" not in html, "a healthy GPU raises nothing"


def test_no_alert_for_sync_boost_or_a_cool_gpu(client, staff, fake_gpus, clean_redis):
    fake_gpus.readings[0] = reading(0, throttle_reasons=["sync_boost"], temperature_c=70.0)
    telemetry.sample_once("calm-host")
    client.force_login(staff)
    assert b'class="alert' not in client.get("/gpus/").content


def test_the_history_uses_minute_means_for_long_ranges(client, staff, clean_redis):
    for minutes_ago, util in ((60 * 30, 10.0), (60 * 24 * 3, 90.0)):
        GpuMinute.objects.create(
            host="h",
            gpu_index=0,
            minute=timezone.now() - timedelta(minutes=minutes_ago),
            samples=12,
            memory_used_bytes=GIB,
            memory_total_bytes=80 * GIB,
            utilization_pct=util,
        )
    client.force_login(staff)
    week = client.get("/gpus/", {"range": "7d"}).context["history"]
    assert [s["utilization_pct"] for s in week] == [[90.0, 10.0]]
    day = client.get("/gpus/", {"range": "24h"}).context["history"]
    assert day == [], "the last day comes from raw samples; there are none"


def test_the_gpu_page_is_for_staff_only(client, db):
    user = get_user_model().objects.create_user("plain")
    client.force_login(user)
    assert client.get("/gpus/").status_code == 403


def _gpu_socket(stack, user):
    headers = {"Origin": stack.http_url, "Cookie": session_cookie(user)}
    url = stack.ws_url.replace("/ws/chat/", "/ws/gpu/")
    return connect(url, additional_headers=headers, open_timeout=10)


def test_live_samples_reach_the_gpu_socket(stack, transactional_db, fake_gpus, clean_redis):
    staff = get_user_model().objects.create_user("live-staff", is_staff=True)
    with _gpu_socket(stack, staff) as socket:
        sampler = telemetry.HostTelemetry(interval_s=0.2, host="live-host").start()
        try:
            deadline = time.monotonic() + 15
            while True:
                frame = json.loads(socket.recv(timeout=max(0.1, deadline - time.monotonic())))
                if frame["type"] == "gpu.samples" and frame["host"] == "live-host":
                    break
        finally:
            sampler.stop()
    assert [s["index"] for s in frame["samples"]] == [0, 1]
    assert frame["samples"][0]["memory_used_bytes"] == 20 * GIB


def test_the_gpu_socket_refuses_non_staff(stack, cast):
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    with pytest.raises((ConnectionClosed, InvalidStatus)):
        with _gpu_socket(stack, cast.charlie) as socket:
            socket.recv(timeout=5)
