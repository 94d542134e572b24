"""The jobs websocket (ws/jobs/): live progress of the jobs a page watches, and the
owner's notifications when a job finishes anywhere in the app.

On connect the socket joins the user's notification group and receives the unread
count. `{"type": "job.subscribe", "job": ID}` follows a job: a job.snapshot, then
job.progress at each step and the generation.* frames of its current pass.
"""

from __future__ import annotations

from channels.db import database_sync_to_async

from mixtralweb import namespace
from mixtralweb.accounts import access

from ..consumers import FrameConsumer, GenerationEventsMixin
from . import services
from .models import Job
from .selectors import job_snapshot, unread_count


class JobConsumer(GenerationEventsMixin, FrameConsumer):
    handlers = {"job.subscribe": "on_subscribe", "job.seen": "on_seen"}
    frame_max_bytes = 4096

    async def on_connect(self):
        self.pass_group: dict[int, str] = {}  # job id -> group of its current pass
        await self.join(namespace.user_jobs_group(self.user.pk))
        count = await database_sync_to_async(unread_count)(self.user.pk)
        await self.send_json({"type": "jobs.unread", "count": count})

    async def on_subscribe(self, frame):
        job = await database_sync_to_async(services.get_job_for_user)(self.user, frame.get("job"))
        # Join before reading the snapshot: a step is then in the snapshot, in a
        # later frame, or both; never lost between the two.
        await self.join(namespace.job_group(job.pk))
        snapshot = await database_sync_to_async(job_snapshot)(job)
        await self._follow_pass(snapshot)
        await self.send_json(snapshot)

    async def on_seen(self, frame):
        job = await database_sync_to_async(services.get_job_for_user)(self.user, frame.get("job"))
        await database_sync_to_async(services.job_mark_seen)(user=self.user, job_id=job.pk)
        count = await database_sync_to_async(unread_count)(self.user.pk)
        await self.send_json({"type": "jobs.unread", "count": count})

    async def _follow_pass(self, snapshot: dict):
        job_id = snapshot["job"]
        current = snapshot.get("current")
        group = namespace.generation_group(current["generation"]) if current else None
        old = self.pass_group.get(job_id)
        if old and old != group:
            await self.leave(old)
        if group:
            await self.join(group)
            self.pass_group[job_id] = group

    async def recheck_access(self):
        watched = list(self.pass_group)
        visible = await database_sync_to_async(_visible_jobs)(self.user, watched)
        for job_id in set(watched) - visible:
            await self.leave(namespace.job_group(job_id))
            await self.leave(self.pass_group.pop(job_id))
            await self.send_json({"type": "access.lost", "job": job_id})

    # --- channel-layer events ------------------------------------------------------
    async def job_progress(self, event):
        await self._follow_pass(event)
        await self.send_json(event)

    async def job_finished(self, event):
        await self.send_json(event)


def _visible_jobs(user, job_ids) -> set[int]:
    user.refresh_from_db(fields=["is_active"])
    return set(access.jobs(user, Job.objects.filter(pk__in=job_ids)).values_list("pk", flat=True))
