"""What monitoring does when inference says a generation ended (in the worker)."""

from __future__ import annotations

import logging

from django.dispatch import receiver

from inference.models import Generation
from inference.signals import generation_finished
from monitoring import prometheus, rollup

log = logging.getLogger(__name__)


@receiver(generation_finished, sender=Generation, dispatch_uid="monitoring.generation_finished")
def account_for_finished_generation(sender, generation: Generation, **kwargs) -> None:
    try:
        rollup.refresh_for(generation)
        prometheus.observe(generation)
    except Exception:  # noqa: BLE001 - accounting must not turn a done answer into a failure
        log.exception("monitoring could not account for generation %s", generation.pk)
