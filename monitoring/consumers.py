"""Live GPU telemetry over a websocket, for the GPU page (staff only).

Thin: the shared base authenticates; join the group the telemetry threads send to,
forward.
"""

from __future__ import annotations

from inference.consumers import FrameConsumer
from mixtralweb import namespace
from mixtralweb.accounts import access


class GpuConsumer(FrameConsumer):
    handlers = {}  # it only sends

    def may_connect(self, user) -> bool:
        return access.is_staff(user)

    async def on_connect(self):
        await self.join(namespace.telemetry_group())

    async def gpu_samples(self, event):
        await self.send_json(event)
