"""A stand-in for monitoring.nvml's backend on machines without an NVIDIA GPU.

It answers like NvmlBackend with readings the test sets, so the code above the
NVML boundary (sampler, telemetry, pages, /metrics) runs as it would on a GPU host.
NvmlBackend itself is tested through a fake pynvml module (tests/fake_pynvml.py).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from monitoring import nvml

GIB = 1024**3


def reading(index: int = 0, **overrides) -> nvml.DeviceReading:
    values = dict(
        index=index,
        uuid=f"GPU-fake-{index:04d}",
        name="Fake A100 80GB",
        memory_used_bytes=20 * GIB,
        memory_total_bytes=80 * GIB,
        utilization_pct=50.0,
        temperature_c=60.0,
        power_w=250.0,
        power_limit_w=400.0,
        sm_clock_mhz=1410.0,
        mem_clock_mhz=1593.0,
        throttle_reasons=[],
        ecc_errors=0,
        processes=[nvml.GpuProcess(os.getpid(), 18 * GIB)],
    )
    values.update(overrides)
    return nvml.DeviceReading(**values)


class FakeBackend:
    """GPUs whose readings tests change between reads (`readings[i] = ...`)."""

    def __init__(self, readings: list[nvml.DeviceReading]):
        self.readings = readings
        self.reads = 0

    def available(self) -> bool:
        return bool(self.readings)

    def device_count(self) -> int:
        return len(self.readings)

    def read(self, device: int | str) -> nvml.DeviceReading:
        self.reads += 1
        if isinstance(device, str):
            device = next(r.index for r in self.readings if r.uuid == device)
        return replace(self.readings[device])

    def inventory(self) -> list[tuple[int, str, str]]:
        return [(r.index, r.uuid, f"00000000:{r.index + 1:02X}:00.0") for r in self.readings]

    def uuid_of(self, uuid: str) -> str | None:
        return uuid if any(r.uuid == uuid for r in self.readings) else None

    def read_all(self) -> list[nvml.DeviceReading]:
        return [self.read(i) for i in range(self.device_count())]


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two fake GPUs behind the NVML boundary, restored after the test."""
    backend = FakeBackend([reading(0), reading(1)])
    monkeypatch.setattr(nvml, "backend", backend)
    return backend


@pytest.fixture
def no_gpu(monkeypatch):
    backend = FakeBackend([])
    monkeypatch.setattr(nvml, "backend", backend)
    return backend
