"""Moves jobs on when one of their passes ends. Connected when inference's models load."""

from __future__ import annotations

import logging

from django.dispatch import receiver

from inference.signals import generation_finished

log = logging.getLogger(__name__)


@receiver(generation_finished, dispatch_uid="jobs.advance_on_generation_finished")
def advance_on_generation_finished(sender, generation, **kwargs) -> None:
    """The worker sends this for every final generation, possibly more than once for
    the same one; advancing is idempotent. Never raises into the worker: a job
    this fails to move is moved by the beat re-drive (tasks.redrive_jobs)."""
    from inference.models import Generation

    from .models import JobChunk
    from .services import job_advance

    if generation.source not in Generation.BACKGROUND_SOURCES:
        return
    try:
        job_id = (
            JobChunk.objects.filter(generations=generation.pk)
            .values_list("job_id", flat=True)
            .first()
        )
        if job_id is not None:
            job_advance(job_id=job_id)
    except Exception:  # noqa: BLE001 - logged; the re-drive retries
        log.exception("could not advance the job of generation %s", generation.pk)
