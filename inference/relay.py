"""The stream relay: a helper process that sends a worker's streamed text to the
channel layer, so that the sends' Python never runs in the decoding process.

Each model worker process starts one (`python -m inference.relay`) and writes to
its stdin one JSON object per line; see publisher.Publisher for the operations.
The relay reads them as they come (never waiting on Redis while it reads, so the
worker's writes never block), coalesces each generation's text (streams.Stream),
and writes one line back per closed generation: {"closed": id, "error": ...}.
It exits when its stdin closes, which is when its worker process ends or dies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

log = logging.getLogger("inference.relay")


async def relay(reader: asyncio.StreamReader, write_line) -> None:
    from channels.layers import get_channel_layer

    from .streams import Stream

    layer = get_channel_layer()
    streams: dict[int, Stream] = {}
    tasks: set[asyncio.Task] = set()

    async def run(stream: Stream) -> None:
        error = await stream.run(layer)
        streams.pop(stream.generation_id, None)
        write_line({"closed": stream.generation_id, "error": error})

    while line := await reader.readline():
        try:
            message = json.loads(line)
            generation_id = message["gen"]
            if message["op"] == "open":
                stream = Stream(generation_id, message.get("offset", 0), message.get("coalesce_s"))
                streams[generation_id] = stream
                task = asyncio.ensure_future(run(stream))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                streams[generation_id].feed(message)
        except (ValueError, KeyError) as exc:
            log.error("relay: ignored a message it could not use (%s): %.200r", exc, line)
    # The worker is gone: finish what was queued, then stop.
    for stream in streams.values():
        stream.feed({"op": "close", "final": None})
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    # Ctrl-C reaches the whole process group: the worker closes our stdin when it
    # stops, and we exit after sending what was queued.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mixtralweb.settings")
    import django

    django.setup()
    out = sys.stdout.buffer

    def write_line(obj: dict) -> None:
        out.write(json.dumps(obj).encode() + b"\n")
        out.flush()

    async def start() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await relay(reader, write_line)

    asyncio.run(start())


if __name__ == "__main__":
    main()
