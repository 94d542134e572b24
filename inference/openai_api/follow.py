"""Follows one generation from an HTTP request: its text as it grows, then its end.

The same pattern as the chat socket (consumers.py, static/js/chat.js): join the
generation's channel-layer group first, then read what the database and Redis already
hold, and de-duplicate later token events by offset; nothing is lost between the two.
If the stream goes quiet, or shows a gap, the stored state is read again, so a lost
event delays an answer but never truncates it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from mixtralweb import namespace

from ..models import Generation
from ..selectors import final_event, live_text

log = logging.getLogger(__name__)

# How long the stream may stay silent before the stored state is read again.
RECHECK_AFTER_S = 5.0


def on_a_pooled_thread(func):
    """Run func on the event loop's shared threads, whose database connections last
    (CONN_MAX_AGE, checked before and after each call), not on the request's own
    thread: under ASGI Django gives every request a new thread, so each call would
    open a new PostgreSQL connection on its way to the first token (Django ticket
    #33497). func must do all its database work itself, in that one call."""
    return database_sync_to_async(func, thread_sensitive=False)


@dataclass
class Text:
    text: str


@dataclass
class Final:
    """The generation's end: the generation.final event's fields."""

    event: dict


def _stored_state(generation_id: int) -> tuple[str, dict | None]:
    gen = Generation.objects.select_related("metrics").get(pk=generation_id)
    if gen.is_final:
        return gen.text, final_event(gen)
    return live_text(gen), None


async def follow(generation_id: int) -> AsyncIterator[Text | Final]:
    """Yield Text pieces in order, then one Final."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    group = namespace.generation_group(generation_id)
    await layer.group_add(group, channel)
    sent = 0
    receiving = None
    try:
        recheck = True
        while True:
            if recheck:
                recheck = False
                text, final = await on_a_pooled_thread(_stored_state)(generation_id)
                if len(text) > sent:
                    yield Text(text[sent:])
                    sent = len(text)
                if final is not None:
                    yield Final(final)
                    return
            if receiving is None:
                # One receive at a time, never cancelled mid-way: a cancelled receive
                # can drop the message it was about to return.
                receiving = asyncio.ensure_future(layer.receive(channel))
            done, _ = await asyncio.wait({receiving}, timeout=RECHECK_AFTER_S)
            if not done:
                recheck = True
                continue
            try:
                message = receiving.result()
            except Exception:  # noqa: BLE001 - the stored state still has the answer
                log.warning("channel layer receive failed; reading the stored state", exc_info=True)
                await asyncio.sleep(1)
                recheck = True
                continue
            finally:
                receiving = None
            if message.get("type") == "generation.token":
                offset, text = message["offset"], message["text"]
                if offset > sent:
                    recheck = True  # a gap: read the live text instead of showing a hole
                    continue
                piece = text[sent - offset :]
                if piece:
                    yield Text(piece)
                    sent += len(piece)
            elif message.get("type") == "generation.final":
                text = message.get("text") or ""
                if len(text) > sent:
                    yield Text(text[sent:])
                if message.get("metrics") is None:
                    # Announced without its metrics (a reaped or never-started run):
                    # take the stored row, which has whatever was recorded.
                    _, stored = await on_a_pooled_thread(_stored_state)(generation_id)
                    message = stored or message
                yield Final(message)
                return
    finally:
        if receiving is not None:
            receiving.cancel()
        await layer.group_discard(group, channel)
