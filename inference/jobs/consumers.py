"""The jobs websocket (ws/jobs/): live progress of the jobs a page watches, and the
owner's notifications when a job finishes anywhere in the app.

On connect the socket joins the user's notification group and receives the unread
count. `{"type": "job.subscribe", "job": ID}` follows a job: a job.snapshot, then
job.progress at each step and the generation.* frames of its current pass.
"""

from __future__ import annotations

import json

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from ..consumers import GenerationEventsMixin
from . import services
from .events import job_snapshot, unread_count

CLOSE_UNAUTHENTICATED = 4401
FRAME_MAX_BYTES = 4096


class JobConsumer(GenerationEventsMixin, AsyncWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.groups_joined: set[str] = set()
        self.watched_jobs: set[int] = set()
        self.pass_group: dict[int, str] = {}  # job id -> group of its current pass
        await self.accept()
        await self._join(services.user_group(user.pk))
        count = await database_sync_to_async(unread_count)(user.pk)
        await self.send_json({"type": "jobs.unread", "count": count})

    async def disconnect(self, code):
        for group in getattr(self, "groups_joined", ()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        raw = text_data if text_data is not None else bytes_data
        if not raw or len(raw) > FRAME_MAX_BYTES:
            return await self.send_error("bad_frame", "Empty or oversized frame.")
        try:
            frame = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return await self.send_error("bad_json", "The frame is not valid JSON.")
        if not isinstance(frame, dict):
            return await self.send_error("bad_frame", 'A frame is a JSON object with a "type".')
        kind = frame.get("type")
        try:
            if kind == "job.subscribe":
                await self.on_subscribe(frame)
            elif kind == "job.seen":
                await self.on_seen(frame)
            else:
                await self.send_error("unknown_type", "Unknown frame type.")
        except services.JobError as exc:
            await self.send_error(exc.code, str(exc))

    async def on_subscribe(self, frame):
        job = await database_sync_to_async(services.get_job_for_user)(self.user, frame.get("job"))
        # Join before reading the snapshot: a step is then in the snapshot, in a
        # later frame, or both; never lost between the two.
        await self._join(job.group_name)
        self.watched_jobs.add(job.pk)
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
        group = f"gen.{current['generation']}" if current else None
        old = self.pass_group.get(job_id)
        if old and old != group:
            await self.channel_layer.group_discard(old, self.channel_name)
            self.groups_joined.discard(old)
        if group:
            await self._join(group)
            self.pass_group[job_id] = group

    async def _join(self, group: str):
        if group not in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.add(group)

    async def send_json(self, content: dict):
        await self.send(text_data=json.dumps(content))

    async def send_error(self, code: str, message: str):
        await self.send_json({"type": "error", "code": code, "message": message})

    # --- channel-layer events ------------------------------------------------------
    async def job_progress(self, event):
        await self._follow_pass(event)
        await self.send_json(event)

    async def job_finished(self, event):
        await self.send_json(event)
