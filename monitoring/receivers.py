"""What monitoring does when inference says a generation started or ended.

In a model worker: each generation's resources are sampled from its start to its
end, and what it cost is recorded before its final event goes out. Anywhere: a
finished generation is added to the usage rollups and the Prometheus counters.
"""

from __future__ import annotations

import functools
import logging
import threading

from django.dispatch import receiver

from inference.models import Generation
from inference.signals import generation_ended, generation_finished, generation_started
from monitoring import prometheus, rollup
from monitoring.recording import record_metrics
from monitoring.sampler import ResourceSampler, cuda_devices_of

log = logging.getLogger(__name__)

# The samplers of this process's running generations, by generation id.
_samplers: dict[int, ResourceSampler] = {}
_lock = threading.Lock()


@functools.cache
def gpu_offload_supported() -> bool:
    """Whether this process's llama.cpp was built with GPU offload (a CPU-only build
    on a GPU host runs on the CPU whatever n_gpu_layers says)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def gpu_devices(model) -> list[int]:
    """The CUDA devices to sample for a run of `model`: none unless it offloads."""
    if not model.n_gpu_layers or not gpu_offload_supported():
        return []
    return cuda_devices_of(model)


@receiver(generation_started, sender=Generation, dispatch_uid="monitoring.generation_started")
def sample_resources(sender, generation: Generation, **kwargs) -> None:
    try:
        sampler = ResourceSampler(gpu_devices(generation.model))
        sampler.__enter__()
    except Exception:  # noqa: BLE001 - sampling must never fail a generation
        log.exception("could not sample the resources of generation %s", generation.pk)
        return
    with _lock:
        _samplers[generation.pk] = sampler


@receiver(generation_ended, sender=Generation, dispatch_uid="monitoring.generation_ended")
def record_what_it_cost(sender, generation: Generation, stats, n_ctx: int, **kwargs) -> None:
    with _lock:
        sampler = _samplers.pop(generation.pk, None)
    resources = {}
    if sampler is not None:
        try:
            sampler.__exit__(None, None, None)
            resources = sampler.summary()
        except Exception:  # noqa: BLE001 - the metrics row is written without them
            log.exception("could not summarise the resources of generation %s", generation.pk)
    try:
        generation.metrics = record_metrics(generation, stats, resources, n_ctx=n_ctx)
    except Exception:  # noqa: BLE001 - a missing record must not turn an answer into a failure
        log.exception("could not record the metrics of generation %s", generation.pk)


@receiver(generation_finished, sender=Generation, dispatch_uid="monitoring.generation_finished")
def account_for_finished_generation(sender, generation: Generation, **kwargs) -> None:
    try:
        rollup.refresh_for(generation)
        prometheus.observe(generation)
    except Exception:  # noqa: BLE001 - accounting must not turn a done answer into a failure
        log.exception("monitoring could not account for generation %s", generation.pk)
