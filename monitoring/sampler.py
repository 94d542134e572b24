"""Samples what a running generation costs: GPU through NVML, CPU through psutil.

A daemon thread reads every `interval_s` while the decode loop runs; it never takes
a lock the decode loop needs, and never raises: a failing read is logged and
skipped. `summary()` turns the samples into RequestMetrics fields.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from statistics import fmean

import psutil
from django.conf import settings

from monitoring import nvml

log = logging.getLogger(__name__)


def _shares(tensor_split: str) -> list[float]:
    shares = []
    for part in (tensor_split or "").split(","):
        try:
            shares.append(float(part) if part.strip() else 0.0)
        except ValueError:
            shares.append(0.0)
    return shares


def cuda_devices_of(model, visible: int | None = None) -> list[int]:
    """The CUDA devices a model loaded with GPU offload uses, its main device first.

    Reads split_mode ("none", "layer", "row"), main_gpu and tensor_split (comma-
    separated proportions; empty: every visible device), as llama.cpp does:
    split "none" uses main_gpu only; otherwise every visible device with a
    non-zero share, and under "row" main_gpu too (it keeps the unsplit tensors).
    `visible` is the number of CUDA devices of this process (default: from NVML).
    """
    if visible is None:
        visible = len(nvml.visible_devices())
    split_mode = getattr(model, "split_mode", "layer") or "layer"
    main = int(getattr(model, "main_gpu", 0) or 0)
    if split_mode == "none":
        return [main] if 0 <= main < visible else []
    shares = _shares(getattr(model, "tensor_split", ""))
    if any(shares[:visible]):
        used = [i for i, share in enumerate(shares[:visible]) if share > 0]
    else:
        used = list(range(visible))
    if split_mode == "row" and 0 <= main < visible and main not in used:
        used.append(main)
    if main in used:
        used.remove(main)
        used.insert(0, main)
    return used


class ResourceSampler:
    """Reads CPU, RSS and (on a GPU) NVML every interval while a generation runs.

    cuda_devices are the CUDA device indices the run uses, its main device first
    (cuda_devices_of), or empty/None when it runs on the CPU. gpu_index is the
    older form for one device.
    """

    def __init__(
        self,
        cuda_devices: list[int] | None = None,
        interval_s: float | None = None,
        *,
        gpu_index: int | None = None,
    ):
        if cuda_devices is None and gpu_index is not None:
            cuda_devices = [gpu_index]
        self.devices: list[str] = []  # NVML UUIDs, the main device first
        try:
            if cuda_devices and nvml.available():
                uuids = (nvml.cuda_device(i) for i in cuda_devices)
                self.devices = [u for u in uuids if u is not None]
        except Exception:  # noqa: BLE001 - then only the CPU is sampled
            log.exception("could not find the GPUs %s in NVML", cuda_devices)
        self.interval_s = interval_s or settings.REQUEST_SAMPLE_INTERVAL_S
        self.pid = os.getpid()
        self._process = psutil.Process(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        # One entry per sample: its time and a reading of every device.
        self.gpu_samples: list[tuple[float, list[nvml.DeviceReading]]] = []
        self.cpu_samples: list[float] = []
        self.rss_samples: list[int] = []
        self.sample_seconds = 0.0  # time spent sampling, to show what sampling costs
        self.samples = 0
        self.errors = 0

    def __enter__(self) -> ResourceSampler:
        self._process.cpu_percent(None)  # the first call only starts the interval
        # The "start" reading is taken here, before the run allocates anything: a
        # reading in the thread could come after the first allocations.
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        began = time.perf_counter()
        try:
            self._read()
        except Exception:  # noqa: BLE001 - a failing read must not end sampling or the run
            self.errors += 1
            if self.errors == 1:
                log.exception("resource sample failed (later failures are counted only)")
        self.samples += 1
        self.sample_seconds += time.perf_counter() - began

    def _read(self) -> None:
        try:
            self.rss_samples.append(self._process.memory_info().rss)
            self.cpu_samples.append(self._process.cpu_percent(None))
        except psutil.Error:
            pass
        if self.devices:
            readings = [nvml.read(uuid) for uuid in self.devices]
            if all(r is not None for r in readings):
                self.gpu_samples.append((time.monotonic(), readings))

    def _process_vram(self, readings: list[nvml.DeviceReading]) -> int | None:
        """This process's VRAM summed over the devices; None where NVML does not
        list it (containers whose NVML sees host PIDs)."""
        found = [
            p.used_bytes
            for r in readings
            for p in r.processes
            if p.pid == self.pid and p.used_bytes is not None
        ]
        return sum(found) if found else None

    def _energy_j(self) -> float | None:
        """The devices' energy counters' difference; integrated power where a
        device has no counter (before Volta), or it went backwards (driver reload)."""
        if len(self.gpu_samples) < 2:
            return None
        first, last = self.gpu_samples[0][1], self.gpu_samples[-1][1]
        counters = [(a.energy_mj, b.energy_mj) for a, b in zip(first, last, strict=True)]
        if all(a is not None and b is not None and b >= a for a, b in counters):
            return sum(b - a for a, b in counters) / 1000
        powers = [[r.power_w for r in readings] for _, readings in self.gpu_samples]
        if any(p is None for sample in powers for p in sample):
            return None
        times = [t for t, _ in self.gpu_samples]
        totals = [sum(sample) for sample in powers]
        return sum(
            (times[i + 1] - times[i]) * (totals[i] + totals[i + 1]) / 2
            for i in range(len(times) - 1)
        )

    def summary(self) -> dict:
        """RequestMetrics fields. Over several devices: VRAM and power summed per
        sample, energy summed, utilisation and clocks the mean over devices,
        temperature the maximum, index and UUID those of the main device."""
        fields: dict = {
            "cpu_mean_pct": fmean(self.cpu_samples[1:]) if len(self.cpu_samples) > 1 else None,
            "rss_peak_bytes": max(self.rss_samples) if self.rss_samples else None,
        }
        if not self.gpu_samples:
            return fields
        samples = [readings for _, readings in self.gpu_samples]
        first, last = samples[0], samples[-1]
        every = [r for readings in samples for r in readings]
        process_vram = [v for v in map(self._process_vram, samples) if v is not None]
        device_vram = [sum(r.memory_used_bytes for r in readings) for readings in samples]
        powers = [
            sum(r.power_w for r in readings)
            for readings in samples
            if all(r.power_w is not None for r in readings)
        ]

        def mean(values):
            values = [v for v in values if v is not None]
            return fmean(values) if values else None

        temps = [r.temperature_c for r in every if r.temperature_c is not None]
        throttles = sorted({reason for r in every for reason in r.throttle_reasons})
        fields.update(
            gpu_index=first[0].index,
            gpu_uuid=first[0].uuid,
            vram_process_start_bytes=self._process_vram(first),
            vram_process_peak_bytes=max(process_vram) if process_vram else None,
            vram_process_end_bytes=self._process_vram(last),
            vram_device_start_bytes=device_vram[0],
            vram_device_peak_bytes=max(device_vram),
            vram_device_end_bytes=device_vram[-1],
            gpu_util_mean_pct=mean(r.utilization_pct for r in every),
            power_mean_w=mean(powers),
            energy_j=self._energy_j(),
            temperature_max_c=max(temps) if temps else None,
            sm_clock_mean_mhz=mean(r.sm_clock_mhz for r in every),
            mem_clock_mean_mhz=mean(r.mem_clock_mhz for r in every),
            throttle_reasons=throttles,
        )
        return fields
