"""A fake pynvml module, so that NvmlBackend itself runs on machines without a GPU.

Installed as monitoring.nvml.pynvml by the `fake_pynvml` fixture. Its constants,
error classes, structs and the wrapper of the unversioned process call are the
real pynvml's, so the bits and the exceptions are what a driver would give. A
driver lacks the calls named in `missing`: as in pynvml, calling one raises
NVMLError_FunctionNotFound, and the unversioned nvmlDeviceGetComputeRunningProcesses
then raises NVMLLibraryMismatchError (not an NVMLError).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import pynvml as real
import pytest

from monitoring import nvml

GIB = 1024**3

# What older drivers lack (each also lacks what the newer ones added).
BEFORE_R550 = frozenset({"nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetTemperatureV"})
BEFORE_R510 = BEFORE_R550 | {"nvmlDeviceGetComputeRunningProcesses_v3"}


@dataclass
class FakeGpu:
    """A GPU (or a MIG device, in a GPU's `mig`). None for a figure: NotSupported."""

    uuid: str
    pci_bus_id: str
    name: str = "NVIDIA H200"
    memory_used: int = 20 * GIB
    memory_total: int = 141 * GIB
    utilization: int | None = 50
    temperature: int | None = 60
    power_mw: int | None = 250_000
    power_limit_mw: int | None = 700_000
    sm_clock: int | None = 1980
    mem_clock: int | None = 2619
    reasons: int = 0
    energy_mj: int | None = 1_000_000
    ecc: int | None = 0
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    failure: Exception | None = None  # raised by every call on this device
    mig: list[FakeGpu] = field(default_factory=list)
    parent: FakeGpu | None = None


def gpu(index: int, **overrides) -> FakeGpu:
    values = dict(
        uuid=f"GPU-{index:08x}-1111-2222-3333-444444444444",
        pci_bus_id=f"00000000:{0x18 + 0x10 * index:02X}:00.0",
        processes=[(os.getpid(), 18 * GIB)],
    )
    values.update(overrides)
    return FakeGpu(**values)


def mig_device(parent: FakeGpu, n: int = 0, **overrides) -> FakeGpu:
    """A MIG device of `parent`: NVML has no power, temperature, clocks, energy or
    utilisation for it (NotSupported); its parent has them, except utilisation."""
    values = dict(
        uuid=f"MIG-{n:08x}-aaaa-bbbb-cccc-dddddddddddd",
        pci_bus_id=parent.pci_bus_id,
        name=f"{parent.name} MIG 3g.71gb",
        memory_used=5 * GIB,
        memory_total=71 * GIB,
        utilization=None,
        temperature=None,
        power_mw=None,
        power_limit_mw=None,
        sm_clock=None,
        mem_clock=None,
        energy_mj=None,
        parent=parent,
    )
    values.update(overrides)
    device = FakeGpu(**values)
    parent.mig.append(device)
    parent.utilization = None  # not supported on a GPU in MIG mode either
    return device


class Handle:
    def __init__(self, device: FakeGpu):
        self.device = device


def _error(code: int) -> real.NVMLError:
    return real.NVMLError(code)  # the real subclass, e.g. NVMLError_NotSupported


def _supported(value):
    if value is None:
        raise _error(real.NVML_ERROR_NOT_SUPPORTED)
    return value


class FakePynvml:
    """The pynvml calls monitoring.nvml makes, answered from FakeGpu objects."""

    def __init__(self, gpus: list[FakeGpu], missing=frozenset()):
        self.gpus = gpus
        self.missing = set(missing)
        self.calls: list[str] = []

    def __getattr__(self, name):
        # Constants, errors and structs are the real ones; a call not faked here is absent.
        value = getattr(real, name)
        if name.startswith("nvml") and callable(value) and not isinstance(value, type):
            raise AttributeError(f"the fake pynvml has no {name}")
        return value

    def _call(self, name: str, handle: Handle | None = None) -> FakeGpu | None:
        self.calls.append(name)
        if name in self.missing:
            raise _error(real.NVML_ERROR_FUNCTION_NOT_FOUND)  # as _nvmlGetFunctionPointer does
        if handle is not None and handle.device.failure is not None:
            raise handle.device.failure
        return handle.device if handle is not None else None

    def nvmlInit(self):
        self._call("nvmlInit")

    def nvmlDeviceGetCount(self):
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._call("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise _error(real.NVML_ERROR_INVALID_ARGUMENT)
        return Handle(self.gpus[index])

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self._call("nvmlDeviceGetHandleByUUID")
        for device in self.gpus + [m for g in self.gpus for m in g.mig]:
            if device.uuid == uuid:  # NVML wants the whole UUID
                return Handle(device)
        raise _error(real.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceIsMigDeviceHandle(self, handle):
        device = self._call("nvmlDeviceIsMigDeviceHandle", handle)
        return ctypes.c_uint(device.parent is not None)  # pynvml returns the c_uint

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle):
        device = self._call("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle)
        if device.parent is None:
            raise _error(real.NVML_ERROR_INVALID_ARGUMENT)
        return Handle(device.parent)

    def nvmlDeviceGetIndex(self, handle):
        device = self._call("nvmlDeviceGetIndex", handle)
        return self.gpus.index(device)

    def nvmlDeviceGetUUID(self, handle):
        return self._call("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle):
        return self._call("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetPciInfo(self, handle):
        device = self._call("nvmlDeviceGetPciInfo", handle)
        info = real.nvmlPciInfo_t()
        info.busId = device.pci_bus_id.encode()
        return info

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        device = self._call("nvmlDeviceGetMemoryInfo", handle)
        free = device.memory_total - device.memory_used
        return real.c_nvmlMemory_t(total=device.memory_total, free=free, used=device.memory_used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        device = self._call("nvmlDeviceGetUtilizationRates", handle)
        return real.c_nvmlUtilization_t(gpu=_supported(device.utilization), memory=10)

    def nvmlDeviceGetPowerUsage(self, handle):
        return _supported(self._call("nvmlDeviceGetPowerUsage", handle).power_mw)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return _supported(self._call("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw)

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type):
        return _supported(self._call("nvmlDeviceGetTotalEccErrors", handle).ecc)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return _supported(self._call("nvmlDeviceGetTotalEnergyConsumption", handle).energy_mj)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == real.NVML_TEMPERATURE_GPU
        return _supported(self._call("nvmlDeviceGetTemperature", handle).temperature)

    def nvmlDeviceGetTemperatureV(self, handle, sensor, version=real.nvmlTemperature_v1):
        assert sensor == real.NVML_TEMPERATURE_GPU and version == real.nvmlTemperature_v1
        return _supported(self._call("nvmlDeviceGetTemperatureV", handle).temperature)

    def nvmlDeviceGetClockInfo(self, handle, clock_type):
        device = self._call("nvmlDeviceGetClockInfo", handle)
        return _supported(device.sm_clock if clock_type == real.NVML_CLOCK_SM else device.mem_clock)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self._call("nvmlDeviceGetCurrentClocksEventReasons", handle).reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):
        return self._call("nvmlDeviceGetCurrentClocksThrottleReasons", handle).reasons

    def _processes(self, name, handle):
        device = self._call(name, handle)
        return [
            real.nvmlFriendlyObject(
                {"pid": pid, "usedGpuMemory": used, "gpuInstanceId": 0, "computeInstanceId": 0}
            )
            for pid, used in device.processes
        ]

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle):
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v2", handle)

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle):
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v3", handle)

    # pynvml's own wrapper: v3, turning FunctionNotFound into NVMLLibraryMismatchError.
    @real.throwOnVersionMismatch
    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self.nvmlDeviceGetComputeRunningProcesses_v3(handle)


@pytest.fixture
def fake_pynvml(monkeypatch):
    """install(gpus, missing=...) puts a fake pynvml under monitoring.nvml, with a
    fresh NvmlBackend and CUDA_VISIBLE_DEVICES unset; returns the fake."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(nvml, "_reported", set())

    def install(gpus: list[FakeGpu] | None = None, missing=frozenset()) -> FakePynvml:
        fake = FakePynvml(gpus if gpus is not None else [gpu(0), gpu(1)], missing)
        monkeypatch.setattr(nvml, "pynvml", fake)
        monkeypatch.setattr(nvml, "backend", nvml.NvmlBackend())
        return fake

    return install
