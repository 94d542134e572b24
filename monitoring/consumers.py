"""Live GPU telemetry over a websocket, for the GPU page (staff only).

Thin: authorise, join the group the telemetry threads send to, forward.
"""

from __future__ import annotations

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from monitoring.telemetry import LIVE_GROUP

FORBIDDEN = 4403


class GpuConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if not (user and user.is_authenticated and user.is_staff):
            await self.close(code=FORBIDDEN)
            return
        await self.channel_layer.group_add(LIVE_GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        await self.channel_layer.group_discard(LIVE_GROUP, self.channel_name)

    async def receive_json(self, content, **kwargs):
        await self.send_json({"type": "error", "message": "This socket only sends."})

    async def gpu_samples(self, event):
        await self.send_json(event)
