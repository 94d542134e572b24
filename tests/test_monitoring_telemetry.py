"""Device telemetry: host sampling, the live Redis view, downsampling and retention."""

from datetime import timedelta

import pynvml
import pytest
from django.utils import timezone

from monitoring import telemetry
from monitoring.models import GpuMinute, GpuSample
from monitoring.tasks import downsample
from tests.fake_nvml import GIB, reading
from tests.fake_pynvml import gpu


@pytest.fixture
def clean_redis(redis_client):
    redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())
    yield redis_client
    redis_client.delete(telemetry.hosts_key(), telemetry.gpus_key())


def test_a_round_stores_every_gpu_of_the_host(db, fake_gpus, clean_redis):
    fake_gpus.readings[1] = reading(1, temperature_c=88.0, throttle_reasons=["hw_thermal"])
    telemetry.sample_once("gpu-host-a")
    rows = list(GpuSample.objects.order_by("gpu_index"))
    assert [(r.host, r.gpu_index) for r in rows] == [("gpu-host-a", 0), ("gpu-host-a", 1)]
    assert rows[1].temperature_c == 88.0 and rows[1].throttle_reasons == ["hw_thermal"]
    assert rows[0].memory_total_bytes == 80 * GIB and rows[0].processes[0]["used_bytes"] > 0
    # (A model worker of the test stack may report its own host meanwhile.)
    gpus = [g for g in telemetry.current_gpus() if g["host"] == "gpu-host-a"]
    assert [g["index"] for g in gpus] == [0, 1]
    hosts = [h for h in telemetry.current_hosts() if h["host"] == "gpu-host-a"]
    assert hosts == [{"host": "gpu-host-a", "gpus": 2, "seen_at": gpus[0]["sampled_at"]}]


def test_one_failing_gpu_does_not_stop_the_round_or_the_heartbeat(db, fake_pynvml, clean_redis):
    lost = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    fake = fake_pynvml([gpu(0, failure=lost), gpu(1, temperature=66)])
    telemetry.sample_once("half-lost-host")
    row = GpuSample.objects.get(host="half-lost-host")
    assert (row.gpu_index, row.gpu_uuid, row.temperature_c) == (1, fake.gpus[1].uuid, 66)
    gpus = [g for g in telemetry.current_gpus() if g["host"] == "half-lost-host"]
    assert [g["index"] for g in gpus] == [1]
    hosts = {h["host"]: h["gpus"] for h in telemetry.current_hosts()}
    assert hosts["half-lost-host"] == 2  # the host has two GPUs, one of them unreadable


def test_a_host_whose_nvml_fails_still_sends_its_heartbeat(db, fake_pynvml, clean_redis):
    def driver_gone():
        raise RuntimeError("driver gone")

    fake = fake_pynvml()
    fake.nvmlDeviceGetCount = driver_gone
    telemetry.sample_once("nvml-gone-host")
    assert "nvml-gone-host" in {h["host"] for h in telemetry.current_hosts()}


def test_a_host_without_a_gpu_is_reported_with_none_and_stores_nothing(db, no_gpu, clean_redis):
    telemetry.sample_once("cpu-host")
    assert GpuSample.objects.count() == 0
    hosts = {h["host"]: h["gpus"] for h in telemetry.current_hosts()}
    assert hosts["cpu-host"] == 0
    assert not [g for g in telemetry.current_gpus() if g["host"] == "cpu-host"]


def test_a_host_that_stopped_reporting_drops_out_of_the_live_view(
    db, fake_gpus, clean_redis, settings
):
    telemetry.sample_once("gone-host")
    settings.GPU_SAMPLE_INTERVAL_S = 5
    later = timezone.now() + timedelta(minutes=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timezone, "now", lambda: later)
        assert telemetry.current_gpus() == [] and telemetry.current_hosts() == []


def _sample(at, **fields):
    values = dict(
        host="h",
        gpu_index=0,
        gpu_uuid="GPU-x",
        sampled_at=at,
        memory_used_bytes=10 * GIB,
        memory_total_bytes=80 * GIB,
        utilization_pct=40.0,
        temperature_c=60.0,
        power_w=200.0,
    )
    values.update(fields)
    return GpuSample.objects.create(**values)


def test_downsampling_keeps_one_mean_per_minute(db):
    now = timezone.now().replace(second=30, microsecond=0)
    minute = now.replace(second=0) - timedelta(minutes=2)
    _sample(minute + timedelta(seconds=5), utilization_pct=20.0, temperature_c=70.0)
    _sample(
        minute + timedelta(seconds=35),
        utilization_pct=60.0,
        temperature_c=80.0,
        memory_used_bytes=20 * GIB,
        throttle_reasons=["sw_power_cap"],
    )
    _sample(now - timedelta(seconds=10))  # the current minute is not complete yet
    assert downsample(now) == 1
    row = GpuMinute.objects.get()
    assert row.minute == minute and row.samples == 2
    assert row.utilization_pct == 40.0 and row.temperature_c == 75.0
    assert row.temperature_max_c == 80.0 and row.memory_used_bytes == 15 * GIB
    assert row.throttle_reasons == ["sw_power_cap"]
    assert downsample(now) == 0, "a minute already folded is not folded again"


def test_retention_drops_old_raw_samples_and_old_minutes(db, settings):
    settings.GPU_RAW_RETENTION_HOURS = 24
    settings.GPU_MINUTE_RETENTION_DAYS = 30
    now = timezone.now()
    _sample(now - timedelta(hours=25))
    kept = _sample(now - timedelta(hours=1))
    GpuMinute.objects.create(
        host="h",
        gpu_index=0,
        minute=now - timedelta(days=31),
        samples=1,
        memory_used_bytes=1,
        memory_total_bytes=2,
    )
    downsample(now)
    assert list(GpuSample.objects.values_list("pk", flat=True)) == [kept.pk]
    assert not GpuMinute.objects.filter(minute__lt=now - timedelta(days=30)).exists()
    assert GpuMinute.objects.filter(minute=kept.sampled_at.replace(second=0, microsecond=0))


def test_the_beat_schedule_runs_downsampling_on_the_ops_queue():
    from mixtralweb.celery import app

    schedule = app.conf.beat_schedule
    assert schedule["downsample-gpu-samples"]["task"] == "monitoring.tasks.downsample_gpu_samples"
    assert "monitoring.tasks.downsample_gpu_samples" in app.tasks
    from mixtralweb import namespace

    # Celery's own router decides where beat's message goes: this deployment's ops queue.
    route = app.amqp.router.route({}, "monitoring.tasks.downsample_gpu_samples")
    assert route["queue"].name == namespace.ops_queue()
