"""mixtralweb.channel_layer against the real Redis: it delivers what channels_redis's
own layer does (members, capacity, expiry, a cancelled receive), with a group send
in two round trips, a receive in one, and a caller's commands first."""

import asyncio
import time
import uuid

import pytest
from channels_redis.core import RedisChannelLayer
from django.conf import settings
from redis.asyncio.connection import Connection

from mixtralweb.channel_layer import FewerTripsChannelLayer

LAYERS = [RedisChannelLayer, FewerTripsChannelLayer]


def make_layer(cls, **config):
    base = dict(settings.CHANNEL_LAYERS["default"]["CONFIG"])
    base["prefix"] = f"test-layer-{uuid.uuid4().hex[:8]}"
    return cls(**{**base, **config})


async def receive_all(layer, channel, timeout_s=0.3) -> list[dict]:
    received = []
    while True:
        try:
            received.append(await asyncio.wait_for(layer.receive(channel), timeout_s))
        except TimeoutError:
            return received


async def cleanup(layer) -> None:
    redis = layer.connection(0)
    keys = [key async for key in redis.scan_iter(match=f"{layer.prefix}*")]
    if keys:
        await redis.delete(*keys)
    await layer.flush()


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_every_member_receives_the_message_once(cls):
    async def scenario():
        layer = make_layer(cls)
        other_process = make_layer(cls, prefix=layer.prefix)
        try:
            a, b = await layer.new_channel(), await layer.new_channel()
            c = await other_process.new_channel()  # another process's channel key
            for channel in (a, b, c):
                await layer.group_add("room", channel)
            await layer.group_send("room", {"type": "hello", "n": 1})
            return [
                await receive_all(layer, a),
                await receive_all(layer, b),
                await receive_all(other_process, c),
            ]
        finally:
            await cleanup(layer)
            await other_process.flush()

    assert asyncio.run(scenario()) == [[{"type": "hello", "n": 1}]] * 3


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_a_full_channel_loses_the_message_and_the_others_get_it(cls):
    async def scenario():
        layer = make_layer(cls, capacity=2)
        # Another process, not receiving: its messages pile up in its key in Redis.
        busy = make_layer(cls, capacity=2, prefix=layer.prefix)
        try:
            free, full = await layer.new_channel(), await busy.new_channel()
            await layer.group_add("room", free)
            await layer.group_add("room", full)
            for n in (1, 2):
                await layer.send(full, {"type": "direct", "n": n})
            await layer.group_send("room", {"type": "group"})
            return await receive_all(layer, free), await receive_all(busy, full)
        finally:
            await cleanup(layer)
            await busy.flush()

    got_free, got_full = asyncio.run(scenario())
    assert got_free == [{"type": "group"}]
    assert got_full == [{"type": "direct", "n": 1}, {"type": "direct", "n": 2}]


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_expired_members_are_dropped_from_the_group(cls):
    async def scenario():
        layer = make_layer(cls, group_expiry=86400)
        try:
            stale, live = await layer.new_channel(), await layer.new_channel()
            await layer.group_add("room", live)
            # Joined two days ago: older than the group expiry.
            await layer.connection(0).zadd(
                layer._group_key("room"), {stale: time.time() - 2 * 86400}
            )
            await layer.group_send("room", {"type": "m"})
            members = await layer.connection(0).zrange(layer._group_key("room"), 0, -1)
            return (
                await receive_all(layer, stale),
                await receive_all(layer, live),
                [m.decode() for m in members],
            )
        finally:
            await cleanup(layer)

    got_stale, got_live, members = asyncio.run(scenario())
    assert got_stale == []
    assert got_live == [{"type": "m"}]
    assert members == [members[0]] and "!" in members[0]


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_messages_older_than_the_expiry_are_dropped_at_the_next_send(cls):
    async def scenario():
        layer = make_layer(cls, expiry=60)
        try:
            channel = await layer.new_channel()
            await layer.group_add("room", channel)
            await layer.group_send("room", {"type": "m", "n": 1})
            # Age the waiting message past the expiry, as if sent two minutes ago.
            key = layer.prefix + layer.non_local_name(channel)
            redis = layer.connection(0)
            (member, _score), *_ = await redis.zrange(key, 0, -1, withscores=True)
            await redis.zadd(key, {member: time.time() - 120})
            await layer.group_send("room", {"type": "m", "n": 2})
            return await receive_all(layer, channel)
        finally:
            await cleanup(layer)

    assert asyncio.run(scenario()) == [{"type": "m", "n": 2}]


def test_before_commands_run_with_the_send():
    async def scenario():
        layer = make_layer(FewerTripsChannelLayer)
        key = f"{layer.prefix}:live"
        try:
            channel = await layer.new_channel()
            await layer.group_add("room", channel)
            await layer.group_send("room", {"type": "m"}, before=lambda p: p.append(key, b"text"))
            return await receive_all(layer, channel), await layer.connection(0).get(key)
        finally:
            await cleanup(layer)

    received, live = asyncio.run(scenario())
    assert received == [{"type": "m"}]
    assert live == b"text"


async def sends_to_redis(send) -> int:
    """How many times this process writes a command or pipeline to Redis (one per
    round trip) while `send` runs: redis-py's connections, counted as they write."""
    writes = 0
    send_packed_command = Connection.send_packed_command

    async def counting(self, *args, **kwargs):
        nonlocal writes
        writes += 1
        return await send_packed_command(self, *args, **kwargs)

    Connection.send_packed_command = counting
    try:
        await send()
    finally:
        Connection.send_packed_command = send_packed_command
    return writes


@pytest.mark.parametrize(
    "cls, expected", [(RedisChannelLayer, 4), (FewerTripsChannelLayer, 2)], ids=["stock", "ours"]
)
def test_round_trips_of_a_group_send(cls, expected):
    """channels_redis's group send waits on Redis four times; this layer's, twice
    (with the caller's commands). If channels_redis's count changes, so may the
    reason for this layer."""

    async def scenario():
        layer = make_layer(cls)
        try:
            channel = await layer.new_channel()
            await layer.group_add("room", channel)
            for _ in range(2):  # loads the script; the pool's connections are open
                await layer.group_send("room", {"type": "warm"})
                await layer.receive(channel)
            await asyncio.sleep(0.1)  # channels_redis's receive cleans up in a task
            if cls is FewerTripsChannelLayer:
                send = layer.group_send("room", {"type": "m"}, before=lambda p: p.ping())
            else:
                send = layer.group_send("room", {"type": "m"})
            writes = await sends_to_redis(lambda: send)
            return writes, [await layer.receive(channel)]
        finally:
            await cleanup(layer)

    writes, received = asyncio.run(scenario())
    assert received == [{"type": "m"}]
    assert writes == expected


def test_several_hosts_fall_back_to_channels_redis_and_still_run_before():
    base = settings.REDIS_URL.split("?")[0].rsplit("/", 1)[0]
    hosts = [{"address": f"{base}/14"}, {"address": f"{base}/15"}]

    async def scenario():
        layer = make_layer(FewerTripsChannelLayer, hosts=hosts)
        key = f"{layer.prefix}:live"
        try:
            channel = await layer.new_channel()
            await layer.group_add("room", channel)
            await layer.group_send("room", {"type": "m"}, before=lambda p: p.set(key, b"x"))
            received = await receive_all(layer, channel)
            return received, await layer.connection(0).get(key)
        finally:
            for index in range(layer.ring_size):
                redis = layer.connection(index)
                keys = [k async for k in redis.scan_iter(match=f"{layer.prefix}*")]
                if keys:
                    await redis.delete(*keys)
            await layer.flush()

    received, value = asyncio.run(scenario())
    assert received == [{"type": "m"}]
    assert value == b"x"


@pytest.mark.parametrize(
    "cls, expected", [(RedisChannelLayer, 3), (FewerTripsChannelLayer, 1)], ids=["stock", "ours"]
)
def test_round_trips_of_a_receive(cls, expected):
    """channels_redis restores a backup queue, pops, then backs the message up
    (and removes it later, in a task of its own); this layer only pops."""

    async def scenario():
        layer = make_layer(cls)
        try:
            channel = await layer.new_channel()
            for _ in range(2):  # the pool's connections are open
                await layer.send(channel, {"type": "warm"})
                await layer.receive(channel)
            await layer.send(channel, {"type": "m"})
            await asyncio.sleep(0.1)  # channels_redis's receive cleans up in a task
            received = []

            async def receive():
                received.append(await layer.receive(channel))

            writes = await sends_to_redis(receive)
            return writes, received
        finally:
            await cleanup(layer)

    writes, received = asyncio.run(scenario())
    assert received == [{"type": "m"}]
    assert writes == expected


@pytest.mark.parametrize("cls", LAYERS, ids=lambda c: c.__name__)
def test_a_receive_cancelled_while_waiting_loses_no_later_message(cls):
    async def scenario():
        layer = make_layer(cls)
        try:
            channel = await layer.new_channel()
            waiting = asyncio.ensure_future(layer.receive(channel))
            await asyncio.sleep(0.2)  # blocked in Redis
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await layer.send(channel, {"type": "m", "n": 1})
            await layer.send(channel, {"type": "m", "n": 2})
            return await receive_all(layer, channel)
        finally:
            await cleanup(layer)

    assert asyncio.run(scenario()) == [{"type": "m", "n": 1}, {"type": "m", "n": 2}]


@pytest.mark.parametrize(
    "cls, expected", [(RedisChannelLayer, 2), (FewerTripsChannelLayer, 1)], ids=["stock", "ours"]
)
def test_round_trips_of_a_group_add(cls, expected):
    async def scenario():
        layer = make_layer(cls, group_expiry=3600)
        try:
            channel = await layer.new_channel()
            await layer.group_add("warm", channel)
            writes = await sends_to_redis(lambda: layer.group_add("room", channel))
            redis = layer.connection(0)
            key = layer._group_key("room")
            return writes, await redis.zrange(key, 0, -1), await redis.ttl(key)
        finally:
            await cleanup(layer)

    writes, members, ttl = asyncio.run(scenario())
    assert writes == expected
    assert len(members) == 1 and 3500 < ttl <= 3600
