"""The NVML boundary: every call into NVIDIA's management library lives here.

Machines without an NVIDIA GPU (laptops, CI) are a normal state: `available()` is
False and readers get None, never invented zeros. Tests on such machines replace
`backend` with a stand-in; the real path is covered by `gpu`-marked tests.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import pynvml

NO_GPU_MESSAGE = "no NVIDIA GPU"

# Clock-event bits (nvidia-ml-py >= 12.535 names; the older "ClocksThrottle" names
# are deprecated aliases with the same values). "GPU idle" and "display clock" are
# not throttling, so they are not reported.
THROTTLE_REASON_NAMES = {
    pynvml.nvmlClocksEventReasonApplicationsClocksSetting: "applications_clocks",
    pynvml.nvmlClocksEventReasonSwPowerCap: "sw_power_cap",
    pynvml.nvmlClocksEventReasonHwSlowdown: "hw_slowdown",
    pynvml.nvmlClocksEventReasonSyncBoost: "sync_boost",
    pynvml.nvmlClocksEventReasonSwThermalSlowdown: "sw_thermal",
    pynvml.nvmlClocksEventReasonHwThermalSlowdown: "hw_thermal",
    pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown: "hw_power_brake",
    pynvml.nvmlClocksThrottleReasonBoardLimit: "board_limit",
    pynvml.nvmlClocksThrottleReasonReliability: "reliability",
}
# Reasons that mean the card is too hot or short of power: the pages raise an alert.
THERMAL_OR_POWER_REASONS = {
    "sw_power_cap",
    "hw_slowdown",
    "sw_thermal",
    "hw_thermal",
    "hw_power_brake",
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
    return [name for bit, name in THROTTLE_REASON_NAMES.items() if mask & bit]


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


def _forget_after_fork() -> None:
    # An NVML handle does not survive a fork: a child initialises its own.
    if isinstance(backend, NvmlBackend):
        backend._lock = threading.Lock()
        backend._ready = None


os.register_at_fork(after_in_child=_forget_after_fork)


def available() -> bool:
    return backend.available()


def read_all() -> list[DeviceReading]:
    return backend.read_all() if backend.available() else []


def read(index: int) -> DeviceReading | None:
    return backend.read(index) if backend.available() else None
