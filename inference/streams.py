"""One generation's stream, as the relay sends it: text coalesced into
`generation.token` messages, events in order, then the final event.

A piece of text that arrives while the previous send is in flight, or less than
`coalesce_s` after it, waits and goes out with the pieces that follow it (events
and the close go out at once). Every send also appends the text to a short-lived
Redis key, the live text a reconnecting client starts from, before the message
goes out (in the same round trip, with mixtralweb.channel_layer): a client's
snapshot is never behind a frame it then receives.

One event waits: `generation.started` goes out with the first token (after it) or
the first progress event, or after STARTED_HOLD_S if neither has come. Sent at
once, it was work for this relay, Redis and every web server at the moment the
model evaluates the prompt (on a CPU host, the same cores), and the first token
came about 6 ms later for it (docs/benchmarks.md); a client learns nothing from it
that the first token does not tell it a moment later.
"""

from __future__ import annotations

import asyncio

from django.conf import settings

from mixtralweb.channel_layer import FewerTripsChannelLayer

from .publisher import LIVE_TEXT_TTL_S, group_name, live_text_key

# How long generation.started waits for company (the first token or progress).
STARTED_HOLD_S = 0.25


def _is_started(item: tuple) -> bool:
    kind, payload, _ = item
    return (
        kind == "event"
        and isinstance(payload, dict)
        and payload.get("type") == "generation.started"
    )


class Stream:
    def __init__(self, generation_id: int, start_offset: int = 0, coalesce_s: float | None = None):
        self.generation_id = generation_id
        self.group = group_name(generation_id)
        self.sent_chars = start_offset
        if coalesce_s is None:
            coalesce_s = settings.STREAM_COALESCE_MS / 1000
        self.coalesce_s = coalesce_s
        self._queue: asyncio.Queue = asyncio.Queue()
        # Set when an event or the close is queued: it ends a coalescing wait.
        self._urgent = asyncio.Event()
        # Set whenever anything is queued: it ends the wait of a held started event.
        self._fed = asyncio.Event()

    def feed(self, message: dict) -> None:
        """Queue {"op": "text", "text", "at"}, {"op": "event", "event"} or
        {"op": "close", "final"}. Never waits."""
        op = message["op"]
        if op == "text":
            self._queue.put_nowait(("text", message["text"], message["at"]))
        elif op in ("event", "close"):
            item = (op, message.get("event") or message.get("final"), None)
            self._queue.put_nowait(item)
            if not _is_started(item):
                self._urgent.set()
        else:
            raise KeyError(f"unknown operation {op!r}")
        self._fed.set()

    async def run(self, layer) -> str | None:
        """Send until the close has been sent. Returns None, or what went wrong (the
        stream then drops the rest, up to and including its close)."""
        loop = asyncio.get_running_loop()
        last_send = float("-inf")
        while True:
            batch = [await self._queue.get()]
            if _is_started(batch[0]) and self._queue.empty():
                self._fed.clear()
                try:
                    await asyncio.wait_for(self._fed.wait(), STARTED_HOLD_S)
                except TimeoutError:
                    pass
            wait = last_send + self.coalesce_s - loop.time()
            if batch[0][0] == "text" and wait > 0 and not self._urgent.is_set():
                try:
                    await asyncio.wait_for(self._urgent.wait(), wait)
                except TimeoutError:
                    pass
            self._urgent.clear()
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if _is_started(batch[0]) and len(batch) > 1:
                # The first token goes first: it is what the user is waiting for.
                started = batch.pop(0)
                texts = next((i for i, item in enumerate(batch) if item[0] != "text"), len(batch))
                batch.insert(texts, started)
            try:
                closing = await self._send(layer, batch)
            except Exception as exc:  # noqa: BLE001 - reported to the worker
                await self._drain_to_close(batch)
                return f"{type(exc).__name__}: {exc}"
            last_send = loop.time()
            if closing:
                return None

    async def _drain_to_close(self, batch: list[tuple]) -> None:
        if any(kind == "close" for kind, _, _ in batch):
            return
        while (await self._queue.get())[0] != "close":
            pass

    async def _send(self, layer: FewerTripsChannelLayer, batch: list[tuple]) -> bool:
        texts: list[str] = []
        produced_at: list[float] = []

        async def flush_texts() -> None:
            if not texts:
                return
            text = "".join(texts)
            key = live_text_key(self.generation_id)

            def append_live_text(pipe) -> None:
                pipe.append(key, text.encode("utf-8")).expire(key, LIVE_TEXT_TTL_S)

            message = {
                "type": "generation.token",
                "generation": self.generation_id,
                "offset": self.sent_chars,
                "text": text,
                "produced_at": produced_at[:],
            }
            # The append runs first, in the send's first round trip.
            await layer.group_send(self.group, message, before=append_live_text)
            self.sent_chars += len(text)
            texts.clear()
            produced_at.clear()

        for kind, payload, at in batch:
            if kind == "text":
                texts.append(payload)
                produced_at.append(at)
                continue
            await flush_texts()
            if payload is not None:
                await layer.group_send(self.group, payload)
            if kind == "close":
                return True
        await flush_texts()
        return False
