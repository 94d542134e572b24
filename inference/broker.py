"""What the broker holds for this deployment's generations: which tasks wait in the
model queues, read so that the reaper can tell a task that is merely waiting from
one that was lost.

Celery's Redis transport keeps each queue as a Redis list of messages in Celery's
message protocol (version 2, documented by Celery): a JSON envelope whose `headers`
name the task, and whose `body`, base64-encoded JSON, holds [args, kwargs, embed].
"""

from __future__ import annotations

import base64
import json
import logging

from mixtralweb import namespace, redis_pool

log = logging.getLogger(__name__)

GENERATE_TASK = "inference.tasks.generate"
REQUEUE_COUNT_TTL_S = 24 * 3600


def generation_in(message: bytes) -> int | None:
    """The generation id a queued message asks to generate, or None."""
    try:
        envelope = json.loads(message)
        if envelope.get("headers", {}).get("task") != GENERATE_TASK:
            return None
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, _kwargs, _embed = json.loads(body)
        return int(args[0])
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def waiting_generations(model_names) -> set[int]:
    """The generations whose tasks wait in these models' queues (interactive and
    bulk) of this deployment."""
    queues = []
    for name in model_names:
        queues += [namespace.model_queue(name), namespace.bulk_queue(name)]
    client = redis_pool.client()
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.lrange(queue, 0, -1)
        contents = pipe.execute()
    waiting = set()
    for messages in contents:
        for message in messages:
            gen_id = generation_in(message)
            if gen_id is not None:
                waiting.add(gen_id)
    return waiting


def count_requeue(generation) -> int:
    """Count one more re-send of the generation's task; returns the count so far."""
    key = namespace.key(
        "gen", namespace.generation_stamp(generation.pk, generation.queued_at), "requeued"
    )
    with redis_pool.client().pipeline(transaction=False) as pipe:
        pipe.incr(key)
        pipe.expire(key, REQUEUE_COUNT_TTL_S)
        count, _ = pipe.execute()
    return count
