"""The NVML boundary and the per-request sampler.

NvmlBackend runs against a fake pynvml module (tests/fake_pynvml.py) whose errors
and bits are the real pynvml's; the sampler's arithmetic also runs against the
substituted backend (tests/fake_nvml.py).
"""

import logging
import os
from types import SimpleNamespace

import pynvml
import pytest

from monitoring import nvml, receivers
from monitoring.sampler import ResourceSampler, cuda_devices_of
from tests.fake_nvml import GIB, reading
from tests.fake_pynvml import BEFORE_R510, BEFORE_R550, gpu, mig_device


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


# --- NvmlBackend.read() through the fake pynvml ---------------------------------


def test_a_current_driver_reads_every_figure(fake_pynvml):
    fake = fake_pynvml()
    r = nvml.read(0)
    assert r.uuid == fake.gpus[0].uuid and r.name == "NVIDIA H200" and r.index == 0
    assert r.memory_used_bytes == 20 * GIB and r.memory_total_bytes == 141 * GIB
    assert (r.utilization_pct, r.temperature_c, r.power_w, r.power_limit_w) == (50, 60, 250, 700)
    assert r.processes == [nvml.GpuProcess(os.getpid(), 18 * GIB)]
    assert r.energy_mj == 1_000_000 and r.pci_bus_id == "00000000:18:00.0" and not r.mig
    # The current calls, not their deprecated forms.
    assert "nvmlDeviceGetTemperatureV" in fake.calls
    assert "nvmlDeviceGetTemperature" not in fake.calls
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" not in fake.calls


def test_the_fake_old_driver_fails_as_pynvml_does(fake_pynvml):
    fake = fake_pynvml(missing=BEFORE_R510)
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLLibraryMismatchError):
        fake.nvmlDeviceGetComputeRunningProcesses(handle)
    assert not issubclass(pynvml.NVMLLibraryMismatchError, pynvml.NVMLError)


def test_a_driver_before_r510_reads_processes_through_the_v2_call(fake_pynvml):
    fake = fake_pynvml(missing=BEFORE_R510)
    r = nvml.read(0)
    assert r.processes == [nvml.GpuProcess(os.getpid(), 18 * GIB)]
    assert "nvmlDeviceGetComputeRunningProcesses_v2" in fake.calls
    fake.calls.clear()
    nvml.read(1)  # the call that works is remembered
    assert "nvmlDeviceGetComputeRunningProcesses_v3" not in fake.calls


def test_a_driver_before_r550_still_reports_throttling(fake_pynvml):
    reasons = pynvml.nvmlClocksThrottleReasonSwPowerCap | pynvml.nvmlClocksThrottleReasonHwSlowdown
    fake = fake_pynvml([gpu(0, reasons=reasons)], missing=BEFORE_R550)
    assert nvml.read(0).throttle_reasons == ["sw_power_cap", "hw_slowdown"]
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" in fake.calls


def test_a_driver_without_the_v_temperature_call_uses_the_old_one(fake_pynvml):
    fake = fake_pynvml([gpu(0, temperature=71)], missing={"nvmlDeviceGetTemperatureV"})
    assert nvml.read(0).temperature_c == 71
    assert "nvmlDeviceGetTemperature" in fake.calls


def test_a_mig_device_has_its_own_memory_and_its_parents_power(fake_pynvml):
    parent = gpu(0)
    instance = mig_device(parent)
    fake_pynvml([parent])
    r = nvml.read(instance.uuid)
    assert r.mig and r.uuid == instance.uuid and r.index == 0
    assert r.memory_used_bytes == 5 * GIB and r.memory_total_bytes == 71 * GIB
    assert r.utilization_pct is None  # NotSupported under MIG
    assert r.power_w == 250 and r.temperature_c == 60 and r.energy_mj == 1_000_000
    assert nvml.read(0).utilization_pct is None  # the parent in MIG mode neither


def test_one_failing_gpu_is_left_out_of_read_all(fake_pynvml):
    fake_pynvml([gpu(0, failure=pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)), gpu(1)])
    assert [r.index for r in nvml.read_all()] == [1]
    assert nvml.device_count() == 2


# --- which devices: CUDA_VISIBLE_DEVICES, CUDA's order, MIG ---------------------


def test_worker_processes_number_cuda_devices_in_pci_bus_order(monkeypatch):
    # mixtralweb/celery.py calls nvml.use_pci_bus_order() as each process starts.
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    nvml.use_pci_bus_order()
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


@pytest.fixture
def swapped_gpus(fake_pynvml):
    """NVML index 0 sits on the later PCI bus: CUDA (in PCI order) calls it 1."""
    return fake_pynvml(
        [gpu(0, pci_bus_id="00000000:9A:00.0"), gpu(1, pci_bus_id="00000000:1B:00.0")]
    )


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, [1, 0]),
        ("", []),
        ("0", [1]),
        ("1,0", [0, 1]),
        ("GPU-00000000", [0]),  # an unambiguous prefix of a UUID
        ("1,GPU-0000000", [0]),  # ambiguous: CUDA stops there
    ],
)
def test_cuda_devices_map_to_nvml_by_pci_bus_id(monkeypatch, swapped_gpus, visible, expected):
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvml.visible_devices() == [swapped_gpus.gpus[i].uuid for i in expected]


def test_empty_cuda_visible_devices_means_no_gpu_is_sampled(monkeypatch, fake_pynvml):
    fake_pynvml()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert nvml.cuda_device(0) is None
    with ResourceSampler([0], interval_s=10) as sampler:
        pass
    assert sampler.devices == [] and "gpu_index" not in sampler.summary()


def test_a_mig_uuid_in_cuda_visible_devices_is_sampled(monkeypatch, fake_pynvml):
    parent = gpu(0)
    instance = mig_device(parent)
    fake_pynvml([parent, gpu(1)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", instance.uuid)
    with ResourceSampler([0], interval_s=10) as sampler:
        pass
    fields = sampler.summary()
    assert fields["gpu_uuid"] == instance.uuid and fields["gpu_index"] == 0
    assert fields["vram_device_peak_bytes"] == 5 * GIB
    assert fields["gpu_util_mean_pct"] is None and fields["power_mean_w"] == 250


def test_a_device_that_names_nothing_is_logged_as_an_error(monkeypatch, fake_pynvml, caplog):
    fake_pynvml()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-ffffffff-0000-0000-0000-000000000000")
    with caplog.at_level(logging.ERROR, logger="monitoring.nvml"):
        assert nvml.visible_devices() == []
        assert nvml.cuda_device(0) is None
    assert "names no device NVML knows" in caplog.text


# --- which devices a model uses, and whether to sample at all -------------------


def _model(**fields):
    return SimpleNamespace(**{"n_gpu_layers": -1, **fields})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, [0, 1, 2]),  # the fields' defaults: layer split, evenly
        ({"split_mode": "none", "main_gpu": 2}, [2]),
        ({"split_mode": "none", "main_gpu": 5}, []),
        ({"split_mode": "layer", "tensor_split": "0,3,1"}, [1, 2]),
        ({"split_mode": "layer", "main_gpu": 2, "tensor_split": "1,0,1"}, [2, 0]),
        ({"split_mode": "row", "main_gpu": 1, "tensor_split": "1,0,1"}, [1, 0, 2]),
        ({"tensor_split": "1,1,1,1,1"}, [0, 1, 2]),  # more shares than devices
    ],
)
def test_cuda_devices_of_a_model(fields, expected):
    assert cuda_devices_of(_model(**fields), visible=3) == expected


@pytest.fixture
def offload(monkeypatch):
    def set_supported(value: bool):
        import llama_cpp

        monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: value)
        receivers.gpu_offload_supported.cache_clear()

    yield set_supported
    receivers.gpu_offload_supported.cache_clear()


def test_a_cpu_only_build_on_a_gpu_host_samples_no_gpu(fake_pynvml, offload):
    fake_pynvml()
    offload(False)
    assert receivers.gpu_devices(_model()) == []


def test_an_offloaded_model_samples_every_gpu_it_uses(monkeypatch, fake_pynvml, offload):
    fake_pynvml()
    offload(True)
    assert receivers.gpu_devices(_model()) == [0, 1]
    assert receivers.gpu_devices(_model(n_gpu_layers=0)) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert receivers.gpu_devices(_model()) == []


# --- the sampler -----------------------------------------------------------------


def test_the_sampler_records_vram_start_peak_and_end(settings, fake_gpus):
    fake_gpus.readings[0] = reading(0, memory_used_bytes=10 * GIB)
    with ResourceSampler([0], interval_s=0.01) as sampler:
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
    assert fields["energy_j"] > 0  # no counter in these readings: integrated power
    assert sampler.samples >= 4 and sampler.sample_seconds > 0


def test_the_sampler_sums_several_devices(fake_pynvml):
    fake = fake_pynvml([gpu(0, temperature=60), gpu(1, temperature=75, power_mw=300_000)])
    with ResourceSampler([1, 0], interval_s=10) as sampler:  # main device: CUDA 1
        fake.gpus[0].energy_mj += 40_000
        fake.gpus[1].energy_mj += 60_000
    fields = sampler.summary()
    assert fields["gpu_index"] == 1 and fields["gpu_uuid"] == fake.gpus[1].uuid
    assert fields["vram_device_peak_bytes"] == 40 * GIB
    assert fields["vram_process_peak_bytes"] == 36 * GIB
    assert fields["power_mean_w"] == 550 and fields["temperature_max_c"] == 75
    assert fields["energy_j"] == 100.0


def test_energy_is_the_counters_difference_not_integrated_power(fake_pynvml):
    fake = fake_pynvml([gpu(0, power_mw=400_000)])
    with ResourceSampler([0], interval_s=10) as sampler:
        fake.gpus[0].energy_mj += 12_345
    assert sampler.summary()["energy_j"] == 12.345


def test_energy_falls_back_to_integrated_power_without_a_counter(fake_pynvml):
    fake_pynvml([gpu(0, energy_mj=None, power_mw=400_000)])
    with ResourceSampler([0], interval_s=0.01) as sampler:
        while len(sampler.gpu_samples) < 3:
            pass
    elapsed = sampler.gpu_samples[-1][0] - sampler.gpu_samples[0][0]
    assert sampler.summary()["energy_j"] == pytest.approx(400 * elapsed)


@pytest.mark.parametrize(
    "failure",
    [
        pynvml.NVMLLibraryMismatchError("not an NVMLError"),
        pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST),
    ],
)
def test_a_failing_read_never_stops_the_sampler(fake_pynvml, failure):
    fake = fake_pynvml([gpu(0)])
    with ResourceSampler([0], interval_s=0.01) as sampler:
        fake.gpus[0].failure = failure
        while sampler.errors < 3:
            pass
        assert sampler._thread.is_alive()
        fake.gpus[0].failure = None
        while len(sampler.gpu_samples) < 2:
            pass
    fields = sampler.summary()  # __exit__ returned: the generation can end
    assert fields["rss_peak_bytes"] > 0 and fields["vram_device_peak_bytes"] == 20 * GIB


def test_the_sampler_leaves_gpu_fields_out_without_a_gpu(no_gpu):
    with ResourceSampler([0], interval_s=0.01) as sampler:
        pass
    fields = sampler.summary()
    assert "vram_device_peak_bytes" not in fields and "gpu_index" not in fields
    assert fields["rss_peak_bytes"] > 0


def test_a_cpu_run_is_not_sampled_on_the_gpu(fake_gpus):
    with ResourceSampler([], interval_s=0.01) as sampler:
        pass
    assert sampler.gpu_samples == [] and "gpu_index" not in sampler.summary()
