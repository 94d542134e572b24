"""The NVML boundary: every call into NVIDIA's management library lives here.

Machines without an NVIDIA GPU (laptops, CI) are a normal state: `available()` is
False and readers get None, never invented zeros. Tests on such machines replace
`backend` with a stand-in; the real path is covered by `gpu`-marked tests.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import pynvml

log = logging.getLogger(__name__)
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
    """One device at one moment. For a MIG device: its own UUID, name, memory,
    processes; the index, power, energy, temperature and clocks of its parent GPU
    (NVML has them only for the whole GPU); utilisation None (not supported)."""

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
    energy_mj: int | None = None  # the driver's counter since it loaded (Volta and newer)
    pci_bus_id: str | None = None
    mig: bool = False


def _missing_errors() -> tuple[type[Exception], ...]:
    # A call the driver lacks: pynvml raises FunctionNotFound, except for its
    # unversioned wrappers, which raise NVMLLibraryMismatchError (not an NVMLError).
    return (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLLibraryMismatchError)


def _optional(call, *args):
    try:
        return call(*args)
    except (pynvml.NVMLError, pynvml.NVMLLibraryMismatchError):
        return None


def _throttle_reasons(mask: int | None) -> list[str]:
    if not mask:
        return []
    return [name for bit, name in THROTTLE_REASON_NAMES.items() if mask & bit]


def _flag(value) -> bool:
    # pynvml returns some flags as the ctypes c_uint itself.
    return bool(getattr(value, "value", value))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Newest call first; an older driver falls through to the next (see _call_newest).
PROCESSES_CALLS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",  # R510 and newer
    "nvmlDeviceGetComputeRunningProcesses_v2",  # pynvml has no v1 wrapper
)
CLOCK_EVENT_CALLS = (
    "nvmlDeviceGetCurrentClocksEventReasons",  # R550 and newer
    "nvmlDeviceGetCurrentClocksThrottleReasons",  # deprecated, same bits
)
TEMPERATURE_CALLS = (
    "nvmlDeviceGetTemperatureV",  # (handle, sensor[, version])
    "nvmlDeviceGetTemperature",  # deprecated, same arguments
)


class NvmlBackend:
    """Reads real devices through pynvml. Initialised once per process, lazily."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ready: bool | None = None
        self._chosen: dict[tuple[str, ...], str] = {}  # the call this driver has

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

    def _call_newest(self, names: tuple[str, ...], *args):
        """The first of `names` this driver (and this pynvml) has, remembered."""
        chosen = self._chosen.get(names)
        for name in (chosen,) if chosen else names:
            call = getattr(pynvml, name, None)
            if call is None:
                continue
            try:
                result = call(*args)
            except _missing_errors():
                continue
            self._chosen[names] = name
            return result
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    def _handle(self, device: int | str):
        # An NVML index, or a UUID: GPU-... or MIG-... (ByUUID takes both).
        if isinstance(device, str):
            return pynvml.nvmlDeviceGetHandleByUUID(device)
        return pynvml.nvmlDeviceGetHandleByIndex(device)

    def inventory(self) -> list[tuple[int, str, str | None]]:
        """(NVML index, UUID, PCI bus id) of every GPU of the host."""
        devices = []
        for index in range(self.device_count()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pci = _optional(pynvml.nvmlDeviceGetPciInfo, handle)
            bus_id = _text(pci.busId).upper() if pci is not None else None
            devices.append((index, _text(pynvml.nvmlDeviceGetUUID(handle)), bus_id))
        return devices

    def uuid_of(self, uuid: str) -> str | None:
        """The full UUID of a GPU- or MIG- UUID NVML knows, else None."""
        try:
            return _text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByUUID(uuid)))
        except pynvml.NVMLError:
            return None

    def read(self, device: int | str) -> DeviceReading:
        handle = self._handle(device)
        mig = _flag(_optional(pynvml.nvmlDeviceIsMigDeviceHandle, handle))
        gpu = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle) if mig else handle
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = _optional(pynvml.nvmlDeviceGetUtilizationRates, handle)  # NotSupported on MIG
        power_mw = _optional(pynvml.nvmlDeviceGetPowerUsage, gpu)
        limit_mw = _optional(pynvml.nvmlDeviceGetEnforcedPowerLimit, gpu)
        ecc = _optional(
            pynvml.nvmlDeviceGetTotalEccErrors,
            gpu,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        )
        processes = _optional(self._call_newest, PROCESSES_CALLS, handle) or []
        pci = _optional(pynvml.nvmlDeviceGetPciInfo, gpu)
        return DeviceReading(
            index=device if isinstance(device, int) else pynvml.nvmlDeviceGetIndex(gpu),
            uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
            name=_text(pynvml.nvmlDeviceGetName(handle)),
            memory_used_bytes=memory.used,
            memory_total_bytes=memory.total,
            utilization_pct=util.gpu if util else None,
            temperature_c=_optional(
                self._call_newest, TEMPERATURE_CALLS, gpu, pynvml.NVML_TEMPERATURE_GPU
            ),
            power_w=power_mw / 1000 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000 if limit_mw is not None else None,
            sm_clock_mhz=_optional(pynvml.nvmlDeviceGetClockInfo, gpu, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=_optional(pynvml.nvmlDeviceGetClockInfo, gpu, pynvml.NVML_CLOCK_MEM),
            throttle_reasons=_throttle_reasons(
                _optional(self._call_newest, CLOCK_EVENT_CALLS, gpu)
            ),
            ecc_errors=ecc,
            processes=[GpuProcess(p.pid, p.usedGpuMemory) for p in processes],
            energy_mj=_optional(pynvml.nvmlDeviceGetTotalEnergyConsumption, gpu),
            pci_bus_id=_text(pci.busId).upper() if pci is not None else None,
            mig=mig,
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


def device_count() -> int:
    return backend.device_count() if backend.available() else 0


def read_all() -> list[DeviceReading]:
    """Every GPU of the host that answers: one failing GPU is logged and left out."""
    readings = []
    for index in range(device_count()):
        try:
            readings.append(backend.read(index))
        except Exception:  # noqa: BLE001 - a lost GPU must not hide the others
            log.exception("NVML could not read GPU %s", index)
    return readings


def read(device: int | str) -> DeviceReading | None:
    """One device by NVML index or UUID (GPU-... or MIG-...)."""
    return backend.read(device) if backend.available() else None


def use_pci_bus_order() -> None:
    """Make CUDA number devices in PCI bus order, the order visible_devices() maps.

    Called as each process starts (mixtralweb/celery.py), before llama.cpp
    initialises CUDA. CUDA's default order puts the fastest device first: neither
    NVML's nor nvidia-smi's, and it changes what an integer in CUDA_VISIBLE_DEVICES
    means.
    """
    if os.environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID") != "PCI_BUS_ID":
        log.warning(
            "CUDA_DEVICE_ORDER=%s replaced by PCI_BUS_ID: GPU figures map CUDA devices "
            "to NVML in PCI bus order",
            os.environ["CUDA_DEVICE_ORDER"],
        )
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"


_reported: set[str] = set()


def _report_once(message: str, *args) -> None:
    text = message % args
    if text not in _reported:
        _reported.add(text)
        log.error(text)


def _resolve(entry: str, in_pci_order: list[str]) -> str | None:
    if entry.isdigit():  # an index in CUDA's order: PCI bus order (use_pci_bus_order)
        return in_pci_order[int(entry)] if int(entry) < len(in_pci_order) else None
    if entry.startswith("GPU-"):  # a UUID, or an unambiguous prefix of one
        matches = [uuid for uuid in in_pci_order if uuid.startswith(entry)]
        return matches[0] if len(matches) == 1 else None
    if entry.startswith("MIG-"):  # a MIG device: NVML finds it by its full UUID
        return backend.uuid_of(entry)
    return None


def visible_devices() -> list[str]:
    """The UUIDs (GPU-... or MIG-...) of this process's CUDA devices, in CUDA's order.

    CUDA_VISIBLE_DEVICES unset: every GPU; empty: none. Like CUDA, the list ends at
    an entry that names no device; that entry is logged as an error.
    """
    if not backend.available():
        return []
    inventory = sorted(backend.inventory(), key=lambda d: (d[2] is None, d[2] or "", d[0]))
    in_pci_order = [uuid for _, uuid, _ in inventory]
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return in_pci_order
    devices: list[str] = []
    for entry in (e.strip() for e in value.split(",")):
        uuid = _resolve(entry, in_pci_order) if entry else None
        if uuid is None:
            if entry:
                _report_once(
                    "CUDA_VISIBLE_DEVICES=%r: %r names no device NVML knows (GPUs: %s); "
                    "CUDA ignores it and every entry after it, and so do the GPU figures",
                    value,
                    entry,
                    ", ".join(in_pci_order),
                )
            break
        devices.append(uuid)
    return devices


def cuda_device(cuda_index: int) -> str | None:
    """The NVML UUID of CUDA device `cuda_index` of this process, or None."""
    devices = visible_devices()
    if cuda_index < len(devices):
        return devices[cuda_index]
    if backend.available():
        _report_once(
            "CUDA device %s is not among this process's %s visible device(s) "
            "(CUDA_VISIBLE_DEVICES=%r): it is not sampled",
            cuda_index,
            len(devices),
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    return None
