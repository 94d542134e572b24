"""GPU alerts shown on the GPU page and the admin overview: too hot, throttled for
heat or power, or nearly out of memory. Thresholds are settings."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from monitoring.nvml import THERMAL_OR_POWER_REASONS


@dataclass(frozen=True)
class Alert:
    host: str
    gpu_index: int
    kind: str  # "temperature", "throttle" or "vram"
    message: str


def gpu_alerts(gpus: list[dict]) -> list[Alert]:
    """Alerts for the latest readings (telemetry.current_gpus())."""
    alerts = []
    limit_c = settings.GPU_ALERT_TEMPERATURE_C
    headroom_pct = settings.GPU_ALERT_VRAM_HEADROOM_PCT
    for gpu in gpus:
        where = dict(host=gpu["host"], gpu_index=gpu["index"])
        name = f"{gpu['host']} GPU {gpu['index']}"
        temperature = gpu.get("temperature_c")
        if temperature is not None and temperature >= limit_c:
            alerts.append(
                Alert(
                    **where,
                    kind="temperature",
                    message=f"{name} is at {temperature:.0f} °C (alert at {limit_c:.0f} °C).",
                )
            )
        throttled = sorted(set(gpu.get("throttle_reasons") or []) & THERMAL_OR_POWER_REASONS)
        if throttled:
            alerts.append(
                Alert(
                    **where,
                    kind="throttle",
                    message=f"{name} is throttling its clocks: {', '.join(throttled)}.",
                )
            )
        total = gpu.get("memory_total_bytes") or 0
        if total:
            free_pct = (total - gpu["memory_used_bytes"]) / total * 100
            if free_pct < headroom_pct:
                alerts.append(
                    Alert(
                        **where,
                        kind="vram",
                        message=f"{name} has {free_pct:.1f} % of its memory free "
                        f"(alert below {headroom_pct:g} %).",
                    )
                )
    return alerts
