"""channels_redis's layer, with fewer Redis round trips per message sent and received.

channels_redis 4.3's `group_send` waits on four commands in turn: it trims the
group's expired members, reads them, trims each member channel's expired
messages, then adds the message to each channel (a Lua script). Every streamed
token frame takes that way, so on one Redis host this layer sends the first two
as one pipeline and the last two as one script; what reaches each channel, and
the capacity and expiry rules, are channels_redis's own. With several hosts (the
sharded layer), the group and its channels may live on different servers: the
send is channels_redis's.

A group add is one round trip instead of two. A receive waits on Redis once per
message, where channels_redis also keeps a backup queue of received messages (see
_brpop_with_clean for why that buys nothing here).

`group_send(..., before=...)` also lets a caller put its own commands ahead of the
send in the first round trip (the stream relay appends the live text there):
Redis runs them before the message reaches any channel.

It uses and overrides channels_redis methods that are not public API
(`_group_key`, `_map_channel_keys_to_connection`, `_brpop_with_clean`,
`_clean_receive_backup`); the version is pinned in pyproject.toml, and
tests/test_channel_layer.py runs the same deliveries through channels_redis's
layer and this one, and counts the round trips.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from channels_redis.core import RedisChannelLayer

log = logging.getLogger(__name__)

# KEYS: the member channels' keys. ARGV: one message per key, then one capacity per
# key, then the oldest score a channel keeps, the message's score, the key's expiry.
SEND_TO_CHANNELS = """
local n = #KEYS
local oldest = ARGV[2 * n + 1]
local now = ARGV[2 * n + 2]
local expiry = ARGV[2 * n + 3]
local over_capacity = 0
for i = 1, n do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, oldest)
    if redis.call('ZCOUNT', KEYS[i], '-inf', '+inf') < tonumber(ARGV[n + i]) then
        redis.call('ZADD', KEYS[i], now, ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return over_capacity
"""


class FewerTripsChannelLayer(RedisChannelLayer):
    async def group_send(self, group, message, before: Callable | None = None):
        """Send `message` to every channel of `group`. before(pipeline): adds
        commands that Redis runs first, in the same round trip."""
        if self.ring_size != 1:
            if before is not None:
                async with self.connection(0).pipeline(transaction=False) as pipe:
                    before(pipe)
                    await pipe.execute()
            return await super().group_send(group, message)
        assert self.require_valid_group_name(group), "Group name not valid"
        connection = self.connection(0)
        key = self._group_key(group)
        async with connection.pipeline(transaction=False) as pipe:
            if before is not None:
                before(pipe)
            pipe.zremrangebyscore(key, min=0, max=int(time.time()) - self.group_expiry)
            pipe.zrange(key, 0, -1)
            members = (await pipe.execute())[-1]
        if not members:
            return
        channel_names = [member.decode("utf8") for member in members]
        keys_by_connection, messages, capacities = self._map_channel_keys_to_connection(
            channel_names, message
        )
        keys = keys_by_connection[0]
        now = time.time()
        over_capacity = await self._send_script(connection)(
            client=connection,
            keys=keys,
            args=[
                *(messages[k] for k in keys),
                *(capacities[k] for k in keys),
                int(now) - int(self.expiry),
                now,
                self.expiry,
            ],
        )
        if over_capacity > 0:
            log.info(
                "%s of %s channels over capacity in group %s",
                over_capacity,
                len(channel_names),
                group,
            )

    async def group_add(self, group, channel):
        """As channels_redis's, its two commands in one round trip."""
        assert self.require_valid_group_name(group), "Group name not valid"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        key = self._group_key(group)
        async with self.connection(self.consistent_hash(group)).pipeline(transaction=False) as pipe:
            await pipe.zadd(key, {channel: time.time()}).expire(key, self.group_expiry).execute()

    async def _brpop_with_clean(self, index, channel, timeout):
        """The receive's pop, alone. channels_redis moves a backup queue back into
        the channel before each pop, and adds each popped message to that backup
        (removed again by a later task): three round trips more per message
        received, one of them between the message's arrival and its delivery. The
        backup guards only that one await, its own: from the pop's reply to the
        receive buffer there is none (receive_single and receive say so), and a
        cancellation during the pop itself loses the message with or without it."""
        result = await self.connection(index).bzpopmin(channel, timeout=timeout)
        return None if result is None else result[1]

    async def _clean_receive_backup(self, index, channel):
        """No backup queue to clean (_brpop_with_clean)."""

    def _send_script(self, connection):
        """The script (called as EVALSHA; loaded again if Redis answers NOSCRIPT). It
        holds no connection: one serves every event loop's clients."""
        script = getattr(self, "_send_to_channels", None)
        if script is None:
            script = self._send_to_channels = connection.register_script(SEND_TO_CHANNELS)
        return script
