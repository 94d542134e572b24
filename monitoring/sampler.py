"""Samples what a running generation costs: GPU through NVML, CPU through psutil.

A daemon thread reads every `interval_s` while the decode loop runs; it never takes
a lock the decode loop needs. `summary()` turns the samples into RequestMetrics
fields.
"""

from __future__ import annotations

import os
import threading
import time
from statistics import fmean

import psutil
from django.conf import settings

from monitoring import nvml


def nvml_index(cuda_index: int) -> int | None:
    """The NVML index of CUDA device `cuda_index` of this process.

    CUDA_VISIBLE_DEVICES renumbers devices for CUDA (a worker pinned to GPU 3 sees
    it as device 0) but not for NVML, which always counts every GPU of the host.
    """
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [v for v in visible if v]
    if not visible or cuda_index >= len(visible):
        return cuda_index
    wanted = visible[cuda_index]
    if wanted.isdigit():
        return int(wanted)
    for reading in nvml.read_all():  # GPU-... UUIDs, possibly abbreviated
        if reading.uuid.startswith(wanted):
            return reading.index
    return None


class ResourceSampler:
    """Reads CPU, RSS and (on a GPU) NVML every interval while a generation runs.

    gpu_index is the CUDA device the run uses (0 for a worker's only GPU), or None
    when the model runs on the CPU.
    """

    def __init__(self, gpu_index: int | None, interval_s: float | None = None):
        self.gpu_index = nvml_index(gpu_index) if gpu_index is not None else None
        if not nvml.available():
            self.gpu_index = None
        self.interval_s = interval_s or settings.REQUEST_SAMPLE_INTERVAL_S
        self.pid = os.getpid()
        self._process = psutil.Process(self.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self.gpu_samples: list[tuple[float, nvml.DeviceReading]] = []
        self.cpu_samples: list[float] = []
        self.rss_samples: list[int] = []
        self.sample_seconds = 0.0  # time spent sampling, to show what sampling costs
        self.samples = 0

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
            self.rss_samples.append(self._process.memory_info().rss)
            self.cpu_samples.append(self._process.cpu_percent(None))
        except psutil.Error:
            pass
        if self.gpu_index is not None:
            reading = nvml.read(self.gpu_index)
            if reading is not None:
                self.gpu_samples.append((time.monotonic(), reading))
        self.samples += 1
        self.sample_seconds += time.perf_counter() - began

    def _process_vram(self, reading: nvml.DeviceReading) -> int | None:
        for process in reading.processes:
            if process.pid == self.pid:
                return process.used_bytes
        return None

    def summary(self) -> dict:
        fields: dict = {
            "cpu_mean_pct": fmean(self.cpu_samples[1:]) if len(self.cpu_samples) > 1 else None,
            "rss_peak_bytes": max(self.rss_samples) if self.rss_samples else None,
        }
        if not self.gpu_samples:
            return fields
        readings = [reading for _, reading in self.gpu_samples]
        first, last = readings[0], readings[-1]
        process_vram = [v for v in map(self._process_vram, readings) if v is not None]
        powers = [r.power_w for r in readings if r.power_w is not None]
        energy_j = None
        if len(powers) == len(readings) and len(readings) > 1:
            times = [t for t, _ in self.gpu_samples]
            energy_j = sum(
                (t1 - t0) * (p0 + p1) / 2
                for (t0, p0), (t1, p1) in zip(
                    zip(times, powers, strict=True),
                    zip(times[1:], powers[1:], strict=True),
                    strict=False,
                )
            )

        def mean(values):
            values = [v for v in values if v is not None]
            return fmean(values) if values else None

        temps = [r.temperature_c for r in readings if r.temperature_c is not None]
        throttles = sorted({reason for r in readings for reason in r.throttle_reasons})
        fields.update(
            gpu_index=first.index,
            gpu_uuid=first.uuid,
            vram_process_start_bytes=self._process_vram(first),
            vram_process_peak_bytes=max(process_vram) if process_vram else None,
            vram_process_end_bytes=self._process_vram(last),
            vram_device_start_bytes=first.memory_used_bytes,
            vram_device_peak_bytes=max(r.memory_used_bytes for r in readings),
            vram_device_end_bytes=last.memory_used_bytes,
            gpu_util_mean_pct=mean(r.utilization_pct for r in readings),
            power_mean_w=mean(powers),
            energy_j=energy_j,
            temperature_max_c=max(temps) if temps else None,
            sm_clock_mean_mhz=mean(r.sm_clock_mhz for r in readings),
            mem_clock_mean_mhz=mean(r.mem_clock_mhz for r in readings),
            throttle_reasons=throttles,
        )
        return fields
