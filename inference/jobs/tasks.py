"""Celery beat task for jobs (mixtralweb/settings.py CELERY_BEAT_SCHEDULE)."""

from celery import shared_task


@shared_task(name="inference.jobs.tasks.redrive_jobs")
def redrive_jobs() -> int:
    """Move on jobs stuck between passes, and drop stale drafts."""
    from .services import jobs_redrive

    return jobs_redrive()
