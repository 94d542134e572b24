"""The NVML boundary and the per-request sampler, with the boundary substituted."""

import pynvml
import pytest

from monitoring import nvml
from monitoring.sampler import ResourceSampler, nvml_index
from tests.fake_nvml import GIB, reading


def test_it_names_throttle_reasons_from_the_real_nvml_bits():
    mask = (
        pynvml.nvmlClocksEventReasonSwPowerCap
        | pynvml.nvmlClocksEventReasonHwThermalSlowdown
        | pynvml.nvmlClocksEventReasonGpuIdle
    )
    assert nvml._throttle_reasons(mask) == ["sw_power_cap", "hw_thermal"]


def test_it_reports_no_throttling_for_an_idle_gpu():
    assert nvml._throttle_reasons(pynvml.nvmlClocksEventReasonGpuIdle) == []
    assert nvml._throttle_reasons(None) == []


def test_it_says_no_gpu_where_nvml_has_none(no_gpu):
    assert nvml.available() is False
    assert nvml.read_all() == []
    assert nvml.read(0) is None


def test_the_sampler_records_vram_start_peak_and_end(settings, fake_gpus):
    fake_gpus.readings[0] = reading(0, memory_used_bytes=10 * GIB)
    with ResourceSampler(gpu_index=0, interval_s=0.01) as sampler:
        fake_gpus.readings[0] = reading(0, memory_used_bytes=30 * GIB, temperature_c=71.0)
        while len(sampler.gpu_samples) < 3:
            pass
        fake_gpus.readings[0] = reading(
            0, memory_used_bytes=25 * GIB, throttle_reasons=["sw_power_cap"]
        )
    fields = sampler.summary()
    assert fields["gpu_index"] == 0 and fields["gpu_uuid"] == "GPU-fake-0000"
    assert fields["vram_device_start_bytes"] == 10 * GIB
    assert fields["vram_device_peak_bytes"] == 30 * GIB
    assert fields["vram_device_end_bytes"] == 25 * GIB
    assert fields["vram_process_peak_bytes"] == 18 * GIB
    assert fields["temperature_max_c"] == 71.0
    assert fields["throttle_reasons"] == ["sw_power_cap"]
    assert fields["power_mean_w"] == 250.0
    assert fields["energy_j"] > 0
    assert sampler.samples >= 4 and sampler.sample_seconds > 0


def test_the_sampler_leaves_gpu_fields_out_without_a_gpu(no_gpu):
    with ResourceSampler(gpu_index=0, interval_s=0.01) as sampler:
        pass
    fields = sampler.summary()
    assert "vram_device_peak_bytes" not in fields and "gpu_index" not in fields
    assert fields["rss_peak_bytes"] > 0


def test_a_cpu_run_is_not_sampled_on_the_gpu(fake_gpus):
    with ResourceSampler(gpu_index=None, interval_s=0.01) as sampler:
        pass
    assert sampler.gpu_samples == [] and "gpu_index" not in sampler.summary()


@pytest.mark.parametrize(
    ("visible", "expected"), [("", 0), ("3", 3), ("2,3", 2), ("GPU-fake-0001", 1)]
)
def test_cuda_visible_devices_maps_to_the_nvml_index(monkeypatch, fake_gpus, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvml_index(0) == expected
