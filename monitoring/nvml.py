"""The NVML boundary: every call into NVIDIA's management library lives here.

Machines without an NVIDIA GPU (laptops, CI) are a normal state: `available()` is
False and readers get None, never invented zeros. Tests on such machines replace
`backend` with a stand-in; the real path is covered by `gpu`-marked tests.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pynvml

NO_GPU_MESSAGE = "no NVIDIA GPU"

THROTTLE_REASON_NAMES = {
    "clocksEventReasonGpuIdle": "gpu_idle",
    "clocksEventReasonApplicationsClocksSetting": "applications_clocks",
    "clocksEventReasonSwPowerCap": "sw_power_cap",
    "clocksEventReasonHwSlowdown": "hw_slowdown",
    "clocksEventReasonSyncBoost": "sync_boost",
    "clocksEventReasonSwThermalSlowdown": "sw_thermal",
    "clocksEventReasonHwThermalSlowdown": "hw_thermal",
    "clocksEventReasonHwPowerBrakeSlowdown": "hw_power_brake",
}


@dataclass
class GpuProcess:
    pid: int
    used_bytes: int | None


@dataclass
class DeviceReading:
    index: int
    uuid: str
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    throttle_reasons: list[str] = field(default_factory=list)
    ecc_errors: int | None = None
    processes: list[GpuProcess] = field(default_factory=list)


def _optional(call, *args):
    try:
        return call(*args)
    except pynvml.NVMLError:
        return None


def _throttle_reasons(mask: int | None) -> list[str]:
    if not mask:
        return []
    names = []
    for attr, name in THROTTLE_REASON_NAMES.items():
        bit = getattr(pynvml, f"nvmlClocksEvent{attr[len('clocksEvent') :]}", None)
        if bit is None:
            bit = getattr(pynvml, f"nvmlClocksThrottle{attr[len('clocksEventReason') :]}", None)
        if bit and mask & bit and name != "gpu_idle":
            names.append(name)
    return names


class NvmlBackend:
    """Reads real devices through pynvml. Initialised once per process, lazily."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ready: bool | None = None

    def available(self) -> bool:
        with self._lock:
            if self._ready is None:
                try:
                    pynvml.nvmlInit()
                    self._ready = pynvml.nvmlDeviceGetCount() > 0
                except pynvml.NVMLError:
                    self._ready = False
            return self._ready

    def device_count(self) -> int:
        return pynvml.nvmlDeviceGetCount() if self.available() else 0

    def read(self, index: int) -> DeviceReading:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = _optional(pynvml.nvmlDeviceGetUtilizationRates, handle)
        power_mw = _optional(pynvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = _optional(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        ecc = _optional(
            pynvml.nvmlDeviceGetTotalEccErrors,
            handle,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        )
        processes = _optional(pynvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
        return DeviceReading(
            index=index,
            uuid=pynvml.nvmlDeviceGetUUID(handle),
            name=pynvml.nvmlDeviceGetName(handle),
            memory_used_bytes=memory.used,
            memory_total_bytes=memory.total,
            utilization_pct=util.gpu if util else None,
            temperature_c=_optional(
                pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU
            ),
            power_w=power_mw / 1000 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000 if limit_mw is not None else None,
            sm_clock_mhz=_optional(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=_optional(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            throttle_reasons=_throttle_reasons(
                _optional(pynvml.nvmlDeviceGetCurrentClocksEventReasons, handle)
            ),
            ecc_errors=ecc,
            processes=[GpuProcess(p.pid, p.usedGpuMemory) for p in processes],
        )

    def read_all(self) -> list[DeviceReading]:
        return [self.read(i) for i in range(self.device_count())]


backend = NvmlBackend()


def available() -> bool:
    return backend.available()


def read_all() -> list[DeviceReading]:
    return backend.read_all() if backend.available() else []


def read(index: int) -> DeviceReading | None:
    return backend.read(index) if backend.available() else None
