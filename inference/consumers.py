"""The chat websocket: authenticate, validate, hand off to services, forward events.

Knows nothing about llama.cpp. Every client frame gets either its answer or an
`error` frame; a bad frame never closes the socket. docs/protocol.md lists the
frames in both directions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import InterfaceError, OperationalError

from mixtralweb import redis_pool

from . import services, workers
from .events import generation_snapshot, message_payload
from .models import Conversation, Generation, Message

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
# Each queued answer's socket re-reads its position this often. Every read goes
# through Channels' one database thread, so with many sockets waiting a shorter
# interval delays everything else (docs/loadtest.md).
QUEUE_UPDATE_S = 3.0


def conversation_group(conversation_id: int) -> str:
    return f"conv.{conversation_id}"


class GenerationEventsMixin:
    """Forwards a generation's channel-layer events (docs/protocol.md) to the client
    as they are. Shared by the chat and the jobs sockets."""

    async def generation_token(self, event):
        await self.send_json(event)

    async def generation_started(self, event):
        await self.send_json(event)

    async def generation_progress(self, event):
        await self.send_json(event)

    async def generation_final(self, event):
        await self.send_json(event)


class ChatConsumer(GenerationEventsMixin, AsyncWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        self.groups_joined: set[str] = set()
        self.queue_watchers: dict[int, asyncio.Future] = {}
        # Generations of this user that this socket follows: a stop for one of them
        # raises the worker's flag before any database work (on_stop).
        self.own_generations: set[int] = set()
        self.redis = None
        await self.accept()

    async def disconnect(self, code):
        for watcher in list(getattr(self, "queue_watchers", {}).values()):
            watcher.cancel()
        for group in getattr(self, "groups_joined", ()):
            await self.channel_layer.group_discard(group, self.channel_name)
        if getattr(self, "redis", None) is not None:
            await self.redis.aclose()

    # --- client frames ----------------------------------------------------------
    async def receive(self, text_data=None, bytes_data=None):
        raw = text_data if text_data is not None else bytes_data
        if raw is None or len(raw) == 0:
            return await self.send_error("empty", "Empty frame.")
        if len(raw) > settings.WS_FRAME_MAX_BYTES:
            return await self.send_error(
                "too_large",
                f"The frame is {len(raw):,} bytes; the limit is {settings.WS_FRAME_MAX_BYTES:,}.",
            )
        try:
            frame = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return await self.send_error("bad_json", "The frame is not valid JSON.")
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return await self.send_error("bad_frame", 'A frame is a JSON object with a "type".')
        retry_after_s = await self._rate_limited(frame)
        if retry_after_s:
            return await self.send_error(
                "rate_limited",
                f"Too many messages: at most {settings.WS_RATE_LIMIT_FRAMES} every "
                f"{settings.WS_RATE_LIMIT_WINDOW_S} s. Try again in {retry_after_s} s.",
                frame,
            )
        handler = self.HANDLERS.get(frame["type"])
        if handler is None:
            return await self.send_error(
                "unknown_type", f"Unknown frame type {frame['type'][:50]!r}.", frame
            )
        try:
            await handler(self, frame)
        except services.ChatError as exc:
            await self.send_error(exc.code, str(exc), frame)
        except (OperationalError, InterfaceError):
            log.exception("database unavailable while handling %s", frame["type"])
            await self.send_error(
                "unavailable", "The database is not answering; nothing was saved. Try again.", frame
            )

    async def _rate_limited(self, frame: dict) -> int:
        """Seconds to wait if this user sent too many frames in the current window
        (counted across all their sockets, in Redis); 0 otherwise.

        For a chat message, the same round trip reads the live workers, which
        on_send needs: one round trip less on the way to its first token."""
        window = settings.WS_RATE_LIMIT_WINDOW_S
        now = int(time.time())
        key = f"wsrate:{self.user.pk}:{now // window}"
        self.live_workers = None
        # One round trip: the key gets its expiry if it has none, then counts.
        async with self._redis().pipeline(transaction=False) as pipe:
            pipe.set(key, 0, ex=window * 2, nx=True).incr(key)
            if frame["type"] == "chat.send" and settings.CHAT_REQUIRE_WORKER:
                workers.queue_live_workers(pipe)
            _, count, *live = await pipe.execute()
        if live:
            self.live_workers = workers.parse_live_workers(live[0])
        if count > settings.WS_RATE_LIMIT_FRAMES:
            return window - now % window
        return 0

    def _redis(self) -> aioredis.Redis:
        if self.redis is None:
            self.redis = redis_pool.async_client()
        return self.redis

    async def on_ping(self, frame):
        await self.send_json({"type": "pong", "request_id": frame.get("request_id")})

    async def on_send(self, frame):
        conversation, message, generation = await database_sync_to_async(services.chat_send)(
            user=self.user,
            content=frame.get("content"),
            conversation_id=frame.get("conversation"),
            model_name=frame.get("model"),
            params=frame.get("params"),
            system_prompt=frame.get("system_prompt") or "",
            overflow=frame.get("overflow"),
            live_workers=self.live_workers,
        )
        await self._accepted(frame, conversation, message, generation)
        # Follow the answer, then read it (a token is then in the snapshot, in a later
        # frame, or both: never lost between the two). This runs while the worker
        # evaluates the prompt on the same cores, so it reads once what the turn, the
        # snapshot and the others' frames all need (docs/benchmarks.md).
        await self._join(f"gen.{generation.pk}")
        payloads = await database_sync_to_async(self._new_turn_payloads)(message, generation)
        turn = {"type": "conversation.turn", "conversation": conversation.pk, "messages": payloads}
        await self.send_json(turn)
        await self.send_json({"type": "generation.snapshot", **payloads[1]["generation"]})
        self._watch_queue(generation.pk)
        # The others watching this conversation add the turn and follow the answer. A
        # conversation this message began has no others: a socket that opens it
        # from now on reads the turn in its snapshot. (The send would reach only
        # this socket, and keep it and Redis busy while the worker claims the answer.)
        if frame.get("conversation") is not None:
            await self.channel_layer.group_send(
                conversation_group(conversation.pk), {**turn, "sender": self.channel_name}
            )

    async def on_regenerate(self, frame):
        conversation, replaced, generation = await database_sync_to_async(services.chat_regenerate)(
            user=self.user,
            conversation_id=frame.get("conversation"),
            overflow=frame.get("overflow"),
        )
        await self._accepted(frame, conversation, replaced, generation)
        await self._changed(conversation.pk)

    async def on_edit(self, frame):
        conversation, message, generation, _ = await database_sync_to_async(services.chat_edit)(
            user=self.user,
            message_id=frame.get("message"),
            content=frame.get("content"),
            overflow=frame.get("overflow"),
        )
        await self._accepted(frame, conversation, message, generation)
        await self._changed(conversation.pk)

    async def _accepted(self, frame, conversation, message, generation):
        self.own_generations.add(generation.pk)
        await self.send_json(
            {
                "type": "chat.accepted",
                "request_id": frame.get("request_id"),
                "conversation": conversation.pk,
                "message": message.pk,
                "generation": generation.pk,
            }
        )
        await self._join(conversation_group(conversation.pk))

    async def _changed(self, conversation_id: int):
        """Turns were replaced: everyone watching re-reads the conversation."""
        await self.channel_layer.group_send(
            conversation_group(conversation_id),
            {"type": "conversation.changed", "conversation": conversation_id},
        )

    async def on_open(self, frame):
        conversation = await database_sync_to_async(services.get_conversation_for_user)(
            self.user, frame.get("conversation")
        )
        await self._join(conversation_group(conversation.pk))
        await self._send_conversation(conversation)

    async def _send_conversation(self, conversation: Conversation):
        # Join every live generation's group before reading the snapshot: a token
        # is then either in the snapshot, in a later frame, or both (the client
        # de-duplicates by offset), never lost between the two.
        live = await database_sync_to_async(list)(
            conversation.generations.filter(
                state__in=[Generation.QUEUED, Generation.RUNNING]
            ).values_list("pk", flat=True)
        )
        for gen_id in live:
            await self._join(f"gen.{gen_id}")
            self._watch_queue(gen_id)
        snapshot = await database_sync_to_async(self._conversation_snapshot)(conversation)
        await self.send_json(snapshot)

    async def on_stop(self, frame):
        # For the user's own answer, raise the worker's flag at once, outside the
        # one database thread; generation_stop then does the database part.
        requested = frame.get("generation") in self.own_generations
        if requested:
            await sync_to_async(services.request_stop, thread_sensitive=False)(frame["generation"])
        gen = await database_sync_to_async(services.generation_stop)(
            user=self.user, generation_id=frame.get("generation"), stop_requested=requested
        )
        if gen.state == Generation.CANCELLED and not gen.started_at:
            # Never reached a worker: announce it ourselves.
            final = await database_sync_to_async(generation_snapshot)(gen)
            final["type"] = "generation.final"
            await self.channel_layer.group_send(gen.group_name, final)

    async def on_subscribe(self, frame):
        gen = await database_sync_to_async(services.get_generation_for_user)(
            self.user, frame.get("generation")
        )
        await self._follow(gen.pk)

    HANDLERS = {
        "ping": on_ping,
        "chat.send": on_send,
        "conversation.open": on_open,
        "generation.stop": on_stop,
        "generation.subscribe": on_subscribe,
        "chat.regenerate": on_regenerate,
        "chat.edit": on_edit,
    }

    # --- helpers ----------------------------------------------------------------
    async def _join(self, group: str):
        if group not in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.add(group)

    async def _follow(self, generation_id: int):
        await self._join(f"gen.{generation_id}")
        gen = await database_sync_to_async(Generation.objects.get)(pk=generation_id)
        if gen.user_id == self.user.pk:
            self.own_generations.add(gen.pk)
        await self.send_json(await database_sync_to_async(generation_snapshot)(gen))
        self._watch_queue(generation_id)

    def _watch_queue(self, generation_id: int):
        """While the generation waits in the queue, send its position and estimate
        every QUEUE_UPDATE_S, until a worker starts it."""
        if generation_id in self.queue_watchers:
            return
        self.queue_watchers[generation_id] = asyncio.ensure_future(
            self._queue_updates(generation_id)
        )

    async def _queue_updates(self, generation_id: int):
        # Every caller has just sent the generation as it stands.
        try:
            while True:
                await asyncio.sleep(QUEUE_UPDATE_S)
                gen = await database_sync_to_async(
                    Generation.objects.filter(pk=generation_id).first
                )()
                if gen is None or gen.state != Generation.QUEUED:
                    return  # started, or deleted with its conversation
                await self.send_json(await database_sync_to_async(generation_snapshot)(gen))
        finally:
            self.queue_watchers.pop(generation_id, None)

    @staticmethod
    def _new_turn_payloads(message: Message, generation: Generation) -> list[dict]:
        """The user's message (as created, its author loaded) and the answer's,
        with the generation read now: the worker may have started it already."""
        assistant = Message.objects.select_related("generation").get(generation=generation)
        return [message_payload(message), message_payload(assistant)]

    @staticmethod
    def _conversation_snapshot(conversation: Conversation) -> dict:
        messages = conversation.messages.current().select_related("author", "generation__metrics")
        return {
            "type": "conversation.snapshot",
            "conversation": {
                "id": conversation.pk,
                "title": str(conversation),
                "model": conversation.model.name,
                "n_ctx": conversation.model.n_ctx,
                "team": conversation.team.name if conversation.team_id else None,
                "owner": conversation.owner.get_username(),
            },
            "messages": [message_payload(m) for m in messages],
        }

    async def send_json(self, content: dict):
        await self.send(text_data=json.dumps(content))

    async def send_error(self, code: str, message: str, frame: dict | None = None):
        error = {"type": "error", "code": code, "message": message}
        if isinstance(frame, dict) and "request_id" in frame:
            error["request_id"] = frame["request_id"]
        await self.send_json(error)

    # --- channel-layer events: generation.* come from GenerationEventsMixin --------

    async def conversation_changed(self, event):
        conversation = await database_sync_to_async(services.get_conversation_for_user)(
            self.user, event["conversation"]
        )
        await self._send_conversation(conversation)

    async def conversation_turn(self, event):
        if event.pop("sender", None) == self.channel_name:
            return  # the socket that sent the message has sent the turn itself
        generation = next(
            (m["generation"]["generation"] for m in event["messages"] if m["generation"]), None
        )
        await self.send_json(event)
        if generation is not None:
            # Join, then send the text so far: this consumer handles one event at a
            # time, so every token frame queued meanwhile follows the snapshot and
            # continues it; a viewer who joined late sees no gap.
            await self._follow(generation)
