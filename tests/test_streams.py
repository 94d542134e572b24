"""The stream relay's coalescing (inference/streams.py) on the real channel layer and
Redis: what a socket in the generation's group receives, in which order, and when."""

import asyncio
import time

from channels.layers import get_channel_layer

from inference import streams
from inference.streams import Stream
from mixtralweb import redis_pool

GEN = 987_654_321  # no real generation has this id


def started() -> dict:
    return {"type": "generation.started", "generation": GEN, "worker": "test:1"}


async def follow(layer, feeds, expect: int) -> list[tuple[float, dict]]:
    """Feed the stream as a worker would (delay_s, message), and return what a
    member of the group receives, with the seconds since the stream began."""
    redis = redis_pool.async_client()
    channel = await layer.new_channel()
    await layer.group_add(f"gen.{GEN}", channel)
    stream = Stream(GEN, coalesce_s=0.025)
    received = []

    async def receive() -> None:
        for _ in range(expect):
            message = await layer.receive(channel)
            received.append((time.monotonic() - began, message))

    began = time.monotonic()
    runner = asyncio.ensure_future(stream.run(layer))
    receiver = asyncio.ensure_future(receive())
    for delay_s, message in feeds:
        await asyncio.sleep(delay_s)
        stream.feed(message)
    assert await asyncio.wait_for(runner, 5) is None
    await asyncio.wait_for(receiver, 5)
    await layer.group_discard(f"gen.{GEN}", channel)
    await redis.delete(f"gen:{GEN}:live")
    await redis.aclose()
    return received


def text(piece: str) -> dict:
    return {"op": "text", "text": piece, "at": time.time()}


def test_started_waits_for_the_first_token_and_follows_it():
    layer = get_channel_layer()
    received = asyncio.run(
        follow(
            layer,
            [
                (0, {"op": "event", "event": started()}),
                (0.1, text("Hello")),
                (0, {"op": "close", "final": {"type": "generation.final", "generation": GEN}}),
            ],
            expect=3,
        )
    )
    kinds = [m["type"] for _, m in received]
    assert kinds == ["generation.token", "generation.started", "generation.final"]
    assert received[0][1]["text"] == "Hello"
    # Held until the token came (at 0.1 s), not sent at once.
    assert received[1][0] > 0.09


def test_started_goes_alone_when_nothing_follows_in_time():
    layer = get_channel_layer()
    received = asyncio.run(
        follow(
            layer,
            [
                (0, {"op": "event", "event": started()}),
                (streams.STARTED_HOLD_S + 0.15, text("Late")),
                (0, {"op": "close", "final": None}),
            ],
            expect=2,
        )
    )
    (at, first), (_, second) = received
    assert first["type"] == "generation.started"
    # Sent when the hold ran out, before the late token was fed.
    assert streams.STARTED_HOLD_S - 0.01 <= at < streams.STARTED_HOLD_S + 0.15
    assert second["type"] == "generation.token" and second["text"] == "Late"


def test_a_progress_event_ends_the_hold_and_keeps_the_order():
    layer = get_channel_layer()
    progress = {"type": "generation.progress", "generation": GEN, "evaluated": 0, "total": 900}
    received = asyncio.run(
        follow(
            layer,
            [
                (0, {"op": "event", "event": started()}),
                (0.05, {"op": "event", "event": progress}),
                (0, {"op": "close", "final": None}),
            ],
            expect=2,
        )
    )
    assert [m["type"] for _, m in received] == ["generation.started", "generation.progress"]
    assert received[0][0] < streams.STARTED_HOLD_S
