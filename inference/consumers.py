"""The websockets: a shared base, and the chat socket (docs/protocol.md).

Consumers are thin: authenticate, check and rate-limit frames, hand off to services,
forward channel-layer events. Every client frame gets its answer or an `error` frame;
a bad frame never closes the socket. Knows nothing about llama.cpp.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import InterfaceError, OperationalError

from mixtralweb import namespace, redis_pool
from mixtralweb.accounts import access

from . import selectors, services, status
from .models import Conversation, Generation

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_MANY = 4429
# A socket re-reads the queue positions of the answers it follows this often while
# any of them waits.
QUEUE_UPDATE_S = 3.0

_redis_by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _redis():
    """One asyncio Redis client per event loop (daphne runs one)."""
    loop = asyncio.get_running_loop()
    client = _redis_by_loop.get(loop)
    if client is None:
        client = _redis_by_loop[loop] = redis_pool.async_client()
    return client


class FrameError(Exception):
    """A frame the socket answers with an error frame."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class FrameConsumer(AsyncWebsocketConsumer):
    """Shared by every socket: authentication, frame checks, a per-user rate limit and
    socket cap, dispatch by frame type, errors as frames, group membership, and
    leaving what the user may no longer see when their access changes."""

    # frame type -> method name
    handlers: dict[str, str] = {}
    frame_max_bytes: int = 0  # 0: WS_FRAME_MAX_BYTES

    def may_connect(self, user) -> bool:
        return True

    async def connect(self):
        user = self.scope.get("user")
        self.groups_joined: set[str] = set()
        self.user = user
        if user is None or not user.is_authenticated or not user.is_active:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not self.may_connect(user):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        if not await self._count_socket():
            # Accepted only to say why: a refused handshake tells a browser nothing.
            await self.accept()
            await self.send_error(
                "too_many_sockets",
                f"You have {settings.WS_SOCKETS_PER_USER} connections open, the most "
                "allowed at once. Close a tab or window of this site; this page will "
                "try again.",
            )
            await self.close(code=CLOSE_TOO_MANY)
            return
        await self.accept()
        # Changes to what this user may see reach every socket of theirs.
        await self.join(namespace.group("user", user.pk))
        session = self.scope.get("session")
        if session is not None and session.session_key:
            await self.join(namespace.group("session", session.session_key))
        await self.on_connect()

    async def on_connect(self):
        pass

    async def disconnect(self, code):
        for group in list(getattr(self, "groups_joined", ())):
            await self.leave(group)
        if getattr(self, "user", None) is not None and self.user.is_authenticated:
            try:
                await _redis().zrem(self._sockets_key(), self.channel_name)
            except Exception:  # noqa: BLE001 - the entry expires by itself
                pass

    # --- frames ---------------------------------------------------------------------------
    async def receive(self, text_data=None, bytes_data=None):
        frame = None
        try:
            frame = self._parse(text_data if text_data is not None else bytes_data)
            await self._rate_limit()
            method = self.handlers.get(frame["type"])
            if method is None:
                raise FrameError("unknown_type", f"Unknown frame type {frame['type'][:50]!r}.")
            await getattr(self, method)(frame)
        except FrameError as exc:
            await self.send_error(exc.code, str(exc), frame)
        except (OperationalError, InterfaceError):
            log.exception("database unavailable while handling a frame")
            await self.send_error(
                "unavailable", "The database is not answering; nothing was saved. Try again.", frame
            )
        except Exception as exc:  # noqa: BLE001 - a bad frame never closes the socket
            code = getattr(exc, "code", None)
            if code is not None and isinstance(exc, ValueError):
                await self.send_error(code, str(exc), frame)  # ChatError, JobError
            else:
                log.exception("a %s frame failed", (frame or {}).get("type"))
                await self.send_error("server_error", "That failed on the server.", frame)

    def _parse(self, raw) -> dict:
        limit = self.frame_max_bytes or settings.WS_FRAME_MAX_BYTES
        if not raw:
            raise FrameError("empty", "Empty frame.")
        if len(raw) > limit:
            raise FrameError(
                "too_large", f"The frame is {len(raw):,} bytes; the limit is {limit:,}."
            )
        try:
            frame = json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError):
            raise FrameError("bad_json", "The frame is not valid JSON.") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise FrameError("bad_frame", 'A frame is a JSON object with a "type".')
        return frame

    async def _rate_limit(self) -> None:
        """Frames per user per window, counted across all their sockets."""
        window = settings.WS_RATE_LIMIT_WINDOW_S
        now = int(time.time())
        key = namespace.key("wsrate", self.user.pk, now // window)
        async with _redis().pipeline(transaction=False) as pipe:
            pipe.incr(key).expire(key, window * 2)
            count, _ = await pipe.execute()
        if count > settings.WS_RATE_LIMIT_FRAMES:
            raise FrameError(
                "rate_limited",
                f"Too many messages: at most {settings.WS_RATE_LIMIT_FRAMES} every {window} s. "
                f"Try again in {window - now % window} s.",
            )

    def _sockets_key(self) -> str:
        return namespace.key("sockets", self.user.pk)

    async def _count_socket(self) -> bool:
        """At most WS_SOCKETS_PER_USER open at once per user (entries expire after a
        day, in case a server died without saying goodbye)."""
        key, now = self._sockets_key(), time.time()
        async with _redis().pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zadd(key, {self.channel_name: now + 86400})
            pipe.zcard(key)
            pipe.expire(key, 86400)
            *_, count, _ = await pipe.execute()
        if count > settings.WS_SOCKETS_PER_USER:
            await _redis().zrem(key, self.channel_name)
            return False
        return True

    async def send_json(self, content: dict):
        await self.send(text_data=json.dumps(content))

    async def send_error(self, code: str, message: str, frame: dict | None = None):
        error = {"type": "error", "code": code, "message": message}
        if isinstance(frame, dict) and "request_id" in frame:
            error["request_id"] = frame["request_id"]
        await self.send_json(error)

    # --- groups and access ----------------------------------------------------------------
    async def join(self, group: str):
        if group not in self.groups_joined:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups_joined.add(group)

    async def leave(self, group: str):
        if group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)
            self.groups_joined.discard(group)

    async def access_changed(self, event):
        """A share, a membership or a deletion changed: drop what is no longer ours."""
        await self.recheck_access()

    async def recheck_access(self):
        pass

    async def access_revoked(self, event):
        """Logged out or deactivated: the socket ends."""
        await self.send_json({"type": "access.revoked", "message": event.get("message", "")})
        await self.close(code=CLOSE_FORBIDDEN)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class GenerationEventsMixin:
    """Forwards a generation's channel-layer events (docs/protocol.md) as they are."""

    async def generation_token(self, event):
        await self.send_json(event)

    async def generation_started(self, event):
        await self.send_json(event)

    async def generation_progress(self, event):
        await self.send_json(event)

    async def generation_final(self, event):
        await self.send_json(event)


class ChatConsumer(GenerationEventsMixin, FrameConsumer):
    handlers = {
        "ping": "on_ping",
        "chat.send": "on_send",
        "chat.regenerate": "on_regenerate",
        "chat.edit": "on_edit",
        "chat.continue": "on_continue",
        "conversation.open": "on_open",
        "generation.stop": "on_stop",
        "generation.subscribe": "on_subscribe",
        "status.watch": "on_status_watch",
    }

    async def on_connect(self):
        # Generations this socket follows -> their conversation (None: followed alone).
        self.following: dict[int, int | None] = {}
        self.conversations: set[int] = set()
        # Who else has each open conversation open now: conversation -> their socket's
        # channel -> their username (presence.* events, below).
        self.watchers: dict[int, dict[str, str]] = {}
        self.queue_watch: asyncio.Task | None = None
        # The model whose status this page shows, and its group.
        self.status_model: str | None = None
        self.status_group: str | None = None

    async def disconnect(self, code):
        if getattr(self, "queue_watch", None) is not None:
            self.queue_watch.cancel()
        for conversation_id in list(getattr(self, "conversations", ())):
            await self._presence(conversation_id, "presence.bye")
        await super().disconnect(code)

    async def on_ping(self, frame):
        await self.send_json({"type": "pong", "request_id": frame.get("request_id")})

    async def on_send(self, frame):
        conversation, message, generation = await database_sync_to_async(services.chat_send)(
            user=self.user,
            content=frame.get("content"),
            conversation_id=frame.get("conversation"),
            model_name=frame.get("model"),
            params=frame.get("params"),
            system_prompt=frame.get("system_prompt"),
            overflow=frame.get("overflow"),
        )
        await self._accepted(frame, conversation, message, generation)
        # Follow the answer, then read it: a token is then in the snapshot, in a
        # later frame, or both; never lost between the two.
        await self._follow(generation.pk, conversation.pk)
        payloads = await database_sync_to_async(selectors.new_turn_payloads)(message, generation)
        turn = {"type": "conversation.turn", "conversation": conversation.pk, "messages": payloads}
        await self.send_json(turn)
        await self.send_json({"type": "generation.snapshot", **payloads[1]["generation"]})
        # The others watching this conversation add the turn and follow the answer.
        await self.channel_layer.group_send(
            namespace.conversation_group(conversation.pk), {**turn, "sender": self.channel_name}
        )

    async def on_regenerate(self, frame):
        conversation, replaced, generation = await database_sync_to_async(services.chat_regenerate)(
            user=self.user,
            conversation_id=frame.get("conversation"),
            overflow=frame.get("overflow"),
        )
        await self._accepted(frame, conversation, replaced, generation)
        await self._changed(conversation.pk)

    async def on_continue(self, frame):
        conversation, replaced, generation = await database_sync_to_async(services.chat_continue)(
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
        await self.send_json(
            {
                "type": "chat.accepted",
                "request_id": frame.get("request_id"),
                "conversation": conversation.pk,
                "title": str(conversation),
                "message": message.pk,
                "generation": generation.pk,
            }
        )
        await self._open(conversation.pk)

    async def _changed(self, conversation_id: int):
        """Turns were replaced: everyone watching re-reads the conversation."""
        await self.channel_layer.group_send(
            namespace.conversation_group(conversation_id),
            {"type": "conversation.changed", "conversation": conversation_id},
        )

    async def on_open(self, frame):
        conversation = await database_sync_to_async(services.get_conversation_for_user)(
            self.user, frame.get("conversation")
        )
        await self._open(conversation.pk)
        await self._send_conversation(conversation)

    async def _open(self, conversation_id: int):
        await self.join(namespace.conversation_group(conversation_id))
        if conversation_id not in self.conversations:
            self.conversations.add(conversation_id)
            self.watchers[conversation_id] = {}
            await self._presence(conversation_id, "presence.hello")

    async def _send_conversation(self, conversation: Conversation):
        # Follow every live generation before reading the snapshot: a token is then
        # in the snapshot, in a later frame, or both (the client trims by offset).
        live = await database_sync_to_async(selectors.live_generation_ids)(conversation)
        for gen_id in live:
            await self._follow(gen_id, conversation.pk)
        snapshot = await database_sync_to_async(selectors.conversation_snapshot)(conversation)
        await self.send_json(snapshot)

    async def on_stop(self, frame):
        await database_sync_to_async(services.generation_stop)(
            user=self.user, generation_id=frame.get("generation")
        )

    async def on_subscribe(self, frame):
        gen = await database_sync_to_async(services.get_generation_for_user)(
            self.user, frame.get("generation")
        )
        await self._follow(gen.pk, gen.conversation_id)
        await self._send_generation(gen.pk)

    async def on_status_watch(self, frame):
        """Show this model's status (one at a time): now, then at each change."""
        model = await database_sync_to_async(services.get_model_for_status)(frame.get("model"))
        group = status.group(model.pk)
        if self.status_group not in (None, group):
            await self.leave(self.status_group)
        # Join, then read: a change is then in the reply, in a later event, or both.
        self.status_model, self.status_group = model.name, group
        await self.join(group)
        await self.send_json(await database_sync_to_async(status.event)(model))

    async def model_status(self, event):
        """A channel-layer event from the model's group (inference/status.py)."""
        if event.get("model") == self.status_model:  # not one left behind meanwhile
            await self.send_json(event)

    async def _follow(self, generation_id: int, conversation_id: int | None):
        if generation_id not in self.following and len(self.following) >= settings.WS_FOLLOW_MAX:
            # The oldest followed answer gives way (a long session opens many).
            oldest = next(iter(self.following))
            await self._unfollow(oldest)
        self.following[generation_id] = conversation_id
        await self.join(namespace.generation_group(generation_id))
        if self.queue_watch is None or self.queue_watch.done():
            self.queue_watch = asyncio.ensure_future(self._queue_updates())

    async def _unfollow(self, generation_id: int):
        self.following.pop(generation_id, None)
        await self.leave(namespace.generation_group(generation_id))

    async def _send_generation(self, generation_id: int):
        gen = await database_sync_to_async(Generation.objects.filter(pk=generation_id).first)()
        if gen is not None:
            await self.send_json(await database_sync_to_async(selectors.generation_snapshot)(gen))

    async def _queue_updates(self):
        """While any followed answer waits in the queue, send its position and
        estimate every QUEUE_UPDATE_S: one reader per socket, whatever it follows."""
        while True:
            await asyncio.sleep(QUEUE_UPDATE_S)
            snapshots = await database_sync_to_async(selectors.queued_snapshots)(
                list(self.following)
            )
            if not snapshots:
                return
            for snapshot in snapshots:
                await self.send_json(snapshot)

    async def recheck_access(self):
        visible = await database_sync_to_async(_still_visible)(
            self.user, self.conversations, list(self.following)
        )
        lost_conversations = self.conversations - visible["conversations"]
        for conversation_id in lost_conversations:
            self.conversations.discard(conversation_id)
            self.watchers.pop(conversation_id, None)
            await self._presence(conversation_id, "presence.bye")
            await self.leave(namespace.conversation_group(conversation_id))
            await self.send_json({"type": "access.lost", "conversation": conversation_id})
        for gen_id in list(self.following):
            if gen_id not in visible["generations"]:
                await self._unfollow(gen_id)

    # --- who is watching: the sockets that have a conversation open greet each other --------
    # No store to go stale: a socket says hello to the conversation's group when it opens
    # it, every other socket there answers it directly, and it says bye when it closes.
    async def _presence(self, conversation_id: int, kind: str):
        await self.channel_layer.group_send(
            namespace.conversation_group(conversation_id),
            {
                "type": kind,
                "conversation": conversation_id,
                "channel": self.channel_name,
                "user": self.user.get_username(),
            },
        )

    async def presence_hello(self, event):
        if event["channel"] == self.channel_name or event["conversation"] not in self.watchers:
            return
        reply = {**event, "type": "presence.here", "channel": self.channel_name}
        await self.channel_layer.send(event["channel"], {**reply, "user": self.user.get_username()})
        await self.presence_here(event)

    async def presence_here(self, event):
        watchers = self.watchers.get(event["conversation"])
        if watchers is None or event["channel"] == self.channel_name:
            return
        watchers[event["channel"]] = event["user"]
        await self._send_watchers(event["conversation"])

    async def presence_bye(self, event):
        watchers = self.watchers.get(event["conversation"])
        if watchers is None or watchers.pop(event["channel"], None) is None:
            return
        await self._send_watchers(event["conversation"])

    async def _send_watchers(self, conversation_id: int):
        me = self.user.get_username()
        users = sorted(set(self.watchers[conversation_id].values()) - {me})
        await self.send_json(
            {"type": "conversation.watchers", "conversation": conversation_id, "users": users}
        )

    # --- channel-layer events: generation.* come from GenerationEventsMixin ----------------
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
            # time, so every token frame queued meanwhile follows the snapshot.
            await self._follow(generation, event["conversation"])
            await self._send_generation(generation)


def _still_visible(user, conversation_ids, generation_ids) -> dict:
    user.refresh_from_db(fields=["is_active"])
    return {
        "conversations": set(
            access.conversations(
                user, Conversation.objects.filter(pk__in=conversation_ids)
            ).values_list("pk", flat=True)
        ),
        "generations": set(
            access.generations(user, Generation.objects.filter(pk__in=generation_ids)).values_list(
                "pk", flat=True
            )
        ),
    }
